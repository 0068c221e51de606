// Package logs names layercache's log verbosity levels, as cert-manager's
// pkg/logs does, so that every package logs a kind of message at the same
// level: logger.V(logs.Debug).Info(...). The default level (0) shows what
// an operator acts on: errors, commits, provisioning, evictions. --zap-log-level
// (or -v) raises it.
package logs

const (
	// Info (0, always shown): state changes a user or an operator sees,
	// such as a claim created, a volume provisioned or published (with its
	// setup time), a commit.
	Info = 0
	// Extended (1): routine steps of a state change, such as a volume
	// unpublished, a gate removed, a PV finished.
	Extended = 1
	// Debug (2): what a reconciler decided and why, skipped work.
	Debug = 2
	// Trace (3): every periodic measurement.
	Trace = 3
)
