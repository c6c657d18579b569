package realtest

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// interruptChild is TestOnInterrupt run again as its own process, with
// KDG_INTERRUPT_CHILD set: it pushes two steps, says it is ready and waits
// for the parent's signal; without one it exits with status 3.
func interruptChild(t *testing.T) {
	in := OnInterrupt(t, "the child's cluster")
	in.Push(func() { fmt.Println("step: remove the dir") })
	in.Push(func() { fmt.Println("step: cluster down") })
	fmt.Println("ready")
	time.Sleep(20 * time.Second)
	fmt.Fprintln(os.Stderr, "no signal came")
	os.Exit(3)
}

func TestOnInterrupt(t *testing.T) {
	if os.Getenv("KDG_INTERRUPT_CHILD") != "" {
		interruptChild(t)
		return
	}
	for _, tc := range []struct {
		name string
		sig  syscall.Signal
	}{
		{"a SIGINT runs the steps newest first and exits with status 1", syscall.SIGINT},
		{"a SIGTERM does the same", syscall.SIGTERM},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestOnInterrupt$")
			cmd.Env = append(os.Environ(), "KDG_INTERRUPT_CHILD=1")
			var stderr strings.Builder
			cmd.Stderr = &stderr
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Process.Kill()
			lines := bufio.NewScanner(stdout)
			for lines.Scan() && lines.Text() != "ready" {
			}
			if err := cmd.Process.Signal(tc.sig); err != nil {
				t.Fatal(err)
			}
			var steps []string
			for lines.Scan() {
				if s, ok := strings.CutPrefix(lines.Text(), "step: "); ok {
					steps = append(steps, s)
				}
			}
			err = cmd.Wait()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 1 {
				t.Errorf("child ended with %v, want exit status 1", err)
			}
			if want := []string{"cluster down", "remove the dir"}; strings.Join(steps, ",") != strings.Join(want, ",") {
				t.Errorf("steps run: %q, want %q", steps, want)
			}
			if want := tc.sig.String() + ": tearing the child's cluster down"; !strings.Contains(stderr.String(), want) {
				t.Errorf("stderr %q does not say %q", stderr.String(), want)
			}
		})
	}
}
