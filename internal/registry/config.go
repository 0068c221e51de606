// Package registry is where caches are kept across nodes, without a store:
// naming (cache NAME of namespace NS is the repository PREFIX/NS/NAME),
// credentials, flags, and an image's lifecycle (tags, pruning, deletion
// with its Cache), which the manager and the node agent share. Pushing and
// pulling, which read and write a node's store, are the node side's:
// package transfer.
package registry

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Config says where caches are kept.
type Config struct {
	// Prefix is REGISTRY[:PORT][/PATH]: cache NAME of namespace NS is the
	// repository PREFIX/NS/NAME.
	Prefix string
	// Insecure allows plain HTTP (test registries).
	Insecure bool
	// AuthFile is a .dockerconfigjson file (the key of a Secret of type
	// kubernetes.io/dockerconfigjson); empty for anonymous access. It is
	// read at each request, so a rotated Secret is picked up.
	AuthFile string
	// Keep is how many pushed generations of a cache the registry keeps
	// (older ones are pruned after a push); zero means DefaultKeep.
	Keep int
	// Transport, if set, carries the requests (tests).
	Transport http.RoundTripper
}

// DefaultKeep is how many generations of a cache the registry keeps.
const DefaultKeep = 3

// Client talks to the registry of a Config.
type Client struct {
	cfg  Config
	opts []name.Option
}

// New checks cfg and returns its client.
func New(cfg Config) (*Client, error) {
	cfg.Prefix = strings.TrimSuffix(cfg.Prefix, "/")
	if cfg.Prefix == "" || strings.Contains(cfg.Prefix, "://") {
		return nil, fmt.Errorf("registry prefix %q: want REGISTRY[:PORT][/PATH], such as registry.example.com/layercache (no scheme)", cfg.Prefix)
	}
	c := &Client{cfg: cfg, opts: []name.Option{name.StrictValidation}}
	if cfg.Insecure {
		c.opts = append(c.opts, name.Insecure)
	}
	if _, err := name.NewRepository(cfg.Prefix+"/ns/cache", c.opts...); err != nil {
		return nil, fmt.Errorf("registry prefix %q: %w", cfg.Prefix, err)
	}
	if cfg.Keep == 0 {
		c.cfg.Keep = DefaultKeep
	}
	if c.cfg.Keep < 1 {
		return nil, fmt.Errorf("registry keep %d: must be at least 1", cfg.Keep)
	}
	if cfg.AuthFile != "" {
		if _, err := readAuthFile(cfg.AuthFile); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Cache names a cache: NAME of namespace NAMESPACE (engine.Key converts
// to it). This package needs no store: naming, credentials and an image's
// lifecycle are the API side's too; pushing and pulling, which read and
// write a node's store, are in package transfer.
type Cache struct {
	Namespace, Name string
}

// Repository is where cache k is kept.
func (c *Client) Repository(k Cache) (name.Repository, error) {
	return name.NewRepository(c.cfg.Prefix+"/"+k.Namespace+"/"+k.Name, c.opts...)
}

// ForReference returns a client of cfg's access settings for the registry
// of ref (an image reference: REGISTRY[:PORT]/PATH[:TAG|@DIGEST]), and
// ref parsed.
func ForReference(cfg Config, ref string) (*Client, name.Reference, error) {
	opts := []name.Option{name.StrictValidation}
	if cfg.Insecure {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(ref, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("image reference %q: %w", ref, err)
	}
	cfg.Prefix = r.Context().RegistryStr()
	c, err := New(cfg)
	return c, r, err
}

// RemoteOptions are the options of every request to the registry:
// transport, credentials, and ctxOpt (the request's context).
func (c *Client) RemoteOptions(ctxOpt remote.Option) []remote.Option {
	opts := []remote.Option{ctxOpt, remote.WithUserAgent("layercache"), remote.WithJobs(4),
		remote.WithRetryBackoff(remote.Backoff{Duration: 500 * time.Millisecond, Factor: 2, Jitter: 0.1, Steps: 3})}
	if c.cfg.AuthFile != "" {
		opts = append(opts, remote.WithAuthFromKeychain(fileKeychain(c.cfg.AuthFile)))
	}
	if c.cfg.Transport != nil {
		opts = append(opts, remote.WithTransport(c.cfg.Transport))
	}
	return opts
}

// fileKeychain resolves credentials from a .dockerconfigjson file.
type fileKeychain string

type dockerConfig struct {
	Auths map[string]struct {
		Auth     string `json:"auth"`
		Username string `json:"username"`
		Password string `json:"password"`
	} `json:"auths"`
}

func readAuthFile(path string) (*dockerConfig, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("registry credentials: %w", err)
	}
	var cfg dockerConfig
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("registry credentials %s: not a .dockerconfigjson: %w", path, err)
	}
	return &cfg, nil
}

// Resolve implements authn.Keychain.
func (k fileKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	cfg, err := readAuthFile(string(k))
	if err != nil {
		return nil, err
	}
	for host, a := range cfg.Auths {
		host = strings.TrimPrefix(strings.TrimPrefix(host, "https://"), "http://")
		host, _, _ = strings.Cut(host, "/")
		if host != r.RegistryStr() {
			continue
		}
		user, pass := a.Username, a.Password
		if a.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return nil, fmt.Errorf("registry credentials for %s: bad auth: %w", host, err)
			}
			user, pass, _ = strings.Cut(string(raw), ":")
		}
		return authn.FromConfig(authn.AuthConfig{Username: user, Password: pass}), nil
	}
	return authn.Anonymous, nil
}
