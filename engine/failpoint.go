package engine

// failpointHook, when set (only by this package's tests), is called at every
// step of an operation that changes the store on disk. The crash tests run a
// child process that SIGKILLs itself at the Nth call, to prove that every
// prefix of every operation leaves a store that reopens consistently.
var failpointHook func(name string)

func failpoint(name string) {
	if failpointHook != nil {
		failpointHook(name)
	}
}
