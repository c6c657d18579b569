package cluster

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestPoll(t *testing.T) {
	notYet := errors.New("not yet")
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name               string
		ctx                context.Context
		ok                 func(calls int) error
		minCalls, maxCalls int    // maxCalls 0: no maximum
		wantErr            string // "" for nil
	}{
		{"returns once ok succeeds", context.Background(),
			func(n int) error {
				if n < 3 {
					return notYet
				}
				return nil
			}, 3, 3, ""},
		{"a timeout names what and ok's last error", context.Background(),
			func(int) error { return notYet }, 2, 0, "thing: not after 50ms: not yet"},
		{"a Final error ends it at once", context.Background(),
			func(int) error { return Final(errors.New("exited")) }, 1, 1, "thing: exited"},
		{"an ended context still calls ok once", canceled,
			func(int) error { return notYet }, 1, 1, "thing: context canceled (last: not yet)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			err := Poll(tc.ctx, "thing", 10*time.Millisecond, 50*time.Millisecond, func() error {
				calls++
				return tc.ok(calls)
			})
			if calls < tc.minCalls || tc.maxCalls > 0 && calls > tc.maxCalls {
				t.Errorf("ok called %d times, want %d to %d (0: any)", calls, tc.minCalls, tc.maxCalls)
			}
			if tc.wantErr == "" {
				if err != nil {
					t.Errorf("Poll: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Poll: %v, want %q", err, tc.wantErr)
			}
		})
	}
}
