package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/layercache/layercache/engine"
	"github.com/layercache/layercache/internal/registry"
)

const usage = `layercache: copy-on-write layered caches, without Kubernetes.

Usage:
  layercache [--root DIR] [-o table|json] COMMAND [ARGS]

Commands:
  mount NAMESPACE/NAME TARGET [--write] [--from NAMESPACE/NAME,...]
                                          mount the cache's last commit at TARGET (a new, empty dir)
                                          with a private writable layer; --write allows committing it;
                                          --from: if the cache has nothing, start from the first of
                                          these caches that has a commit (commits still go to NAME)
  umount TARGET [--commit] [--no-compact] unmount; --commit makes what was written the cache's next
                                          generation, otherwise it is discarded
  ls                                      list caches
  volumes                                 list volumes and where they are mounted
  inspect NAMESPACE/NAME                  show a cache's generations, layers and volumes
  compact [NAMESPACE/NAME] [--if-needed]  merge a cache's layers into one (every cache if none given)
  gc                                      remove layers and generations nothing uses
  du                                      disk use per cache and per volume
  rm NAMESPACE/NAME                       delete a cache and its data (refused while a volume uses it)
  push NAMESPACE/NAME REF                 push the cache's head as an OCI image to REF (REGISTRY/PATH:TAG)
  pull REF NAMESPACE/NAME                 make the image at REF (a tag or @sha256:...) the cache's next
                                          generation; refused if the cache holds newer content
      --registry-insecure                 plain HTTP (test registries only)
      --registry-auth-file FILE           credentials, a .dockerconfigjson file (default: anonymous)

Flags (anywhere on the line):
  --root DIR   the store (default /var/lib/layercache, or $LAYERCACHE_ROOT)
  -o FORMAT    table (default) or json
  --layer-format auto|erofs|dir
               how pulled layers are kept (default auto: EROFS images where the kernel mounts them)

Exit codes: 0 success, 1 failure, 2 bad usage or input.
`

// usageError is bad input: exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

type cli struct {
	root        string
	output      string
	layerFormat string
	registry    registry.Config
	out         io.Writer
	store       *engine.Store
	flags       *flag.FlagSet
}

type command struct {
	args  string // positional arguments, for messages
	nargs [2]int // min, max positional arguments
	flags func(fs *flag.FlagSet)
	run   func(c *cli, args []string) error
	// registry: the command talks to a registry (its access flags).
	registry bool
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c := &cli{out: stdout}
	err := c.dispatch(args)
	if err == nil {
		return 0
	}
	fmt.Fprintf(stderr, "layercache: %s\n", err)
	var ue usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}

// commands are the CLI's commands, by name.
func commands() map[string]*command {
	return map[string]*command{
		"mount": {args: "NAMESPACE/NAME TARGET", nargs: [2]int{2, 2}, run: (*cli).mount,
			flags: func(fs *flag.FlagSet) {
				fs.Bool("write", false, "allow committing this volume")
				fs.Bool("setuid", false, "mount without nosuid: setuid binaries in the cache run with their owner's rights")
				fs.String("from", "", "fallback caches, NAMESPACE/NAME separated by commas")
			}},
		"umount": {args: "TARGET", nargs: [2]int{1, 1}, run: (*cli).umount,
			flags: func(fs *flag.FlagSet) {
				fs.Bool("commit", false, "commit what was written")
				fs.Bool("no-compact", false, "do not compact after committing")
			}},
		"ls":      {nargs: [2]int{0, 0}, run: (*cli).ls},
		"volumes": {nargs: [2]int{0, 0}, run: (*cli).volumes},
		"inspect": {args: "NAMESPACE/NAME", nargs: [2]int{1, 1}, run: (*cli).inspect},
		"compact": {args: "[NAMESPACE/NAME]", nargs: [2]int{0, 1}, run: (*cli).compact,
			flags: func(fs *flag.FlagSet) {
				fs.Bool("if-needed", false, "only caches whose chain reached the compaction threshold")
			}},
		"gc":   {nargs: [2]int{0, 0}, run: (*cli).gc},
		"du":   {nargs: [2]int{0, 0}, run: (*cli).du},
		"rm":   {args: "NAMESPACE/NAME", nargs: [2]int{1, 1}, run: (*cli).rm},
		"push": {args: "NAMESPACE/NAME REF", nargs: [2]int{2, 2}, run: (*cli).push, registry: true},
		"pull": {args: "REF NAMESPACE/NAME", nargs: [2]int{2, 2}, run: (*cli).pull, registry: true},
	}
}

func (c *cli) dispatch(args []string) error {
	// Global flags may come before the command.
	var name string
	var rest []string
	for i := 0; i < len(args); i++ {
		if !strings.HasPrefix(args[i], "-") {
			name, rest = args[i], append(slices.Clone(args[:i]), args[i+1:]...)
			break
		}
		if !strings.Contains(args[i], "=") && i+1 < len(args) {
			i++ // the flag's value
		}
	}
	if name == "" {
		return usagef("no command given (see layercache --help)")
	}
	cmd, ok := commands()[name]
	if !ok {
		return usagef("unknown command %q (see layercache --help)", name)
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	root := os.Getenv("LAYERCACHE_ROOT")
	if root == "" {
		root = engine.DefaultRoot
	}
	fs.StringVar(&c.root, "root", root, "store directory")
	fs.StringVar(&c.output, "o", "table", "output format: table or json")
	fs.StringVar(&c.layerFormat, "layer-format", string(engine.LayerFormatAuto), "how pulled layers are kept")
	if cmd.flags != nil {
		cmd.flags(fs)
	}
	if cmd.registry {
		c.registry.BindAccess(fs)
	}
	pos, err := parseInterspersed(fs, rest)
	if err != nil {
		return usagef("%s: %s", name, err)
	}
	if len(pos) < cmd.nargs[0] || len(pos) > cmd.nargs[1] {
		return usagef("%s takes %s, got %d argument(s)", name, orNone(cmd.args), len(pos))
	}
	if c.output != "table" && c.output != "json" {
		return usagef("-o %q: want table or json", c.output)
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("must run as root: the store is root's and overlay mounts need CAP_SYS_ADMIN")
	}
	format, err := engine.ParseLayerFormat(c.layerFormat)
	if err != nil {
		return usagef("--layer-format: %s", err)
	}
	if c.store, err = engine.Open(c.root, engine.Options{LayerFormat: format}); err != nil {
		return err
	}
	c.flags = fs
	return cmd.run(c, pos)
}

func orNone(s string) string {
	if s == "" {
		return "no arguments"
	}
	return s
}

// parseInterspersed parses flags wherever they appear among the arguments.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func (c *cli) boolFlag(name string) bool {
	f := c.flags.Lookup(name)
	return f != nil && f.Value.String() == "true"
}

func (c *cli) json(v any) error {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (c *cli) table(header string, rows [][]string) error {
	w := tabwriter.NewWriter(c.out, 0, 4, 3, ' ', 0)
	fmt.Fprintln(w, header)
	for _, r := range rows {
		fmt.Fprintln(w, strings.Join(r, "\t"))
	}
	return w.Flush()
}

func parseKey(s string) (engine.Key, error) {
	k, err := engine.ParseKey(s)
	if err != nil {
		return k, usageError{err.Error()}
	}
	return k, nil
}

func absTarget(s string) (string, error) {
	if s == "" {
		return "", usagef("target must not be empty")
	}
	p, err := filepath.Abs(s)
	if err != nil {
		return "", err
	}
	if real, err := filepath.EvalSymlinks(p); err == nil {
		p = real
	}
	return p, nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t).Round(time.Second)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	default:
		return fmt.Sprintf("%dd ago", int(d.Hours()/24))
	}
}
