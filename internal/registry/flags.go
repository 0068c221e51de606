package registry

import (
	"flag"
	"time"
)

// Flags are the registry settings of the manager and the node agent.
type Flags struct {
	Config
	// PullTimeout bounds an on-demand pull on a build's path (node agent).
	PullTimeout time.Duration
}

// DefaultPullTimeout is how long a build may wait for a pull.
const DefaultPullTimeout = 60 * time.Second

// Bind registers the flags that say where the registry is (the manager
// deletes a deleted Cache's images there).
func (f *Flags) Bind(fs *flag.FlagSet) {
	fs.StringVar(&f.Prefix, "registry", "", "keep caches in this OCI registry, as REGISTRY[:PORT][/PATH]/NAMESPACE/CACHE (empty: caches stay on their nodes)")
	f.Config.BindAccess(fs)
}

// BindAccess registers the flags that say how to reach a registry (the
// CLI's push and pull take these too).
func (c *Config) BindAccess(fs *flag.FlagSet) {
	fs.BoolVar(&c.Insecure, "registry-insecure", false, "talk to the registry over plain HTTP (test registries only)")
	fs.StringVar(&c.AuthFile, "registry-auth-file", "", "registry credentials: a .dockerconfigjson file, the key of a Secret of type kubernetes.io/dockerconfigjson (empty: anonymous)")
}

// BindNode registers Bind's flags and the node agent's own.
func (f *Flags) BindNode(fs *flag.FlagSet) {
	f.Bind(fs)
	fs.IntVar(&f.Keep, "registry-keep", DefaultKeep, "how many generations of each cache the registry keeps (older ones are deleted after a push)")
	fs.DurationVar(&f.PullTimeout, "registry-pull-timeout", DefaultPullTimeout, "how long a volume's setup waits for a pull before the build starts from what the node has")
}

// Client returns the configured client, or nil without --registry.
func (f *Flags) Client() (*Client, error) {
	if f.Prefix == "" {
		return nil, nil
	}
	return New(f.Config)
}
