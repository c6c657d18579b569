package realtest

import (
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"testing"
)

// Interrupt undoes what a test started when the test binary is interrupted
// (SIGINT, SIGTERM): a test's own clean-ups never run then, and a kubelet, a
// VM or a cert-manager left running would hold the host. go test's
// -timeout panics instead, which no handler sees.
type Interrupt struct {
	mu    sync.Mutex
	steps []func()
	sigs  chan os.Signal
}

// OnInterrupt starts watching for SIGINT and SIGTERM until the test's
// clean-ups end (create it before the clean-ups it backs up, so that it still
// watches while they run). On a signal it prints that it tears what down,
// runs the steps pushed so far, newest first, and exits the process with
// status 1.
func OnInterrupt(t testing.TB, what string) *Interrupt {
	in := &Interrupt{sigs: make(chan os.Signal, 1)}
	signal.Notify(in.sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		sig, ok := <-in.sigs
		if !ok {
			return
		}
		fmt.Fprintf(os.Stderr, "%v: tearing %s down\n", sig, what)
		in.mu.Lock() // held to the exit: nothing is pushed while the steps run
		for i := len(in.steps) - 1; i >= 0; i-- {
			in.steps[i]()
		}
		os.Exit(1)
	}()
	t.Cleanup(func() {
		signal.Stop(in.sigs)
		close(in.sigs)
	})
	return in
}

// Push adds a step to run on a signal, before the steps pushed earlier.
func (in *Interrupt) Push(step func()) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.steps = append(in.steps, step)
}
