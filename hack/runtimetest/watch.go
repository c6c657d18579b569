package runtimetest

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubediskguard/kubediskguard/applier/runtime"
)

// Watcher runs a runtime's Watch in the background and records what it
// delivers, with the time it arrived.
type Watcher struct {
	subscribed chan time.Time
	events     chan Stamped
	done       chan error
	// early is set when an event was handled before subscribed was called.
	early atomic.Bool
}

// Stamped is an event and when the handler got it.
type Stamped struct {
	runtime.Event
	At time.Time
}

// Watch starts rt.Watch(ctx, ...) in the background.
func Watch(ctx context.Context, rt runtime.Runtime) *Watcher {
	w := &Watcher{
		subscribed: make(chan time.Time, 1),
		events:     make(chan Stamped, 1000),
		done:       make(chan error, 1),
	}
	var subscribed atomic.Bool
	go func() {
		w.done <- rt.Watch(ctx, func() {
			if subscribed.Swap(true) {
				w.early.Store(true) // called twice: as wrong as an early event
			}
			w.subscribed <- time.Now()
		}, func(ev runtime.Event) {
			if !subscribed.Load() {
				w.early.Store(true)
			}
			w.events <- Stamped{Event: ev, At: time.Now()}
		})
	}()
	return w
}

// Subscribed waits until subscribed is called and returns when, or
// returns Watch's error if it returned first.
func (w *Watcher) Subscribed(t testing.TB, timeout time.Duration) (time.Time, error) {
	t.Helper()
	select {
	case at := <-w.subscribed:
		return at, nil
	case err := <-w.done:
		if err == nil {
			t.Fatal("Watch returned nil before it subscribed")
		}
		return time.Time{}, err
	case <-time.After(timeout):
		t.Fatalf("Watch did not call subscribed within %s", timeout)
	}
	return time.Time{}, nil
}

// Next returns the next event, failing the test if none comes within
// timeout or an event came before subscribed.
func (w *Watcher) Next(t testing.TB, timeout time.Duration) Stamped {
	t.Helper()
	select {
	case ev := <-w.events:
		if w.early.Load() {
			t.Fatal("Watch handled an event before it called subscribed, or called subscribed twice")
		}
		return ev
	case err := <-w.done:
		t.Fatalf("Watch returned %v while an event was expected", err)
	case <-time.After(timeout):
		t.Fatalf("no event within %s", timeout)
	}
	return Stamped{}
}

// Maybe returns the next event if one comes within d.
func (w *Watcher) Maybe(t testing.TB, d time.Duration) (Stamped, bool) {
	t.Helper()
	select {
	case ev := <-w.events:
		return ev, true
	case <-time.After(d):
		return Stamped{}, false
	}
}

// Quiet fails the test if an event comes within d.
func (w *Watcher) Quiet(t testing.TB, d time.Duration) {
	t.Helper()
	select {
	case ev := <-w.events:
		t.Fatalf("unexpected event %s %s", ev.Kind, ev.ContainerID)
	case <-time.After(d):
	}
}

// Done waits until Watch returns, and returns its error.
func (w *Watcher) Done(t testing.TB, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-w.done:
		return err
	case <-time.After(timeout):
		t.Fatalf("Watch did not return within %s", timeout)
	}
	return nil
}
