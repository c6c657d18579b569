package app

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	logf "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
)

// Reset is `kubediskguard-applier reset`: it clears every limit the applier
// manages on this node — the data disk's limits on every cgroup at and
// below kubepods (the node cap, QoS classes, pods and containers), on
// cgroup v1 and v2 — and writes what it cleared to out. With
// o.Reset.AllDevices it clears the limits of every device there, for a data
// disk that is no longer mounted. It reads the same settings as the
// applier (cgroup root and version, /proc, data disk) and needs no cluster.
// Running it again finds nothing to clear. Stop the applier first, or it
// writes the limits again.
//
// With o.Reset.Wait it serves /readyz on the health probe address, ready
// once it has cleared, and then waits until ctx is done (the one container
// of a one-shot DaemonSet, Ready once its node is clean).
func Reset(ctx context.Context, o *Options, out io.Writer) error {
	log := logf.FromContext(ctx)
	if o.Reset.Wait {
		var done atomic.Bool
		var wg sync.WaitGroup
		defer wg.Wait()
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		probes := *o
		probes.MetricsBindAddress = "0" // nothing to measure
		ready := func(*http.Request) error {
			if !done.Load() {
				return errors.New("the reset has not completed")
			}
			return nil
		}
		if err := serve(ctx, &wg, &probes, nil, ready, func(*http.Request) error { return nil }); err != nil {
			return err
		}
		once := *o
		once.Reset.Wait = false
		if err := Reset(ctx, &once, out); err != nil {
			return err
		}
		done.Store(true)
		<-ctx.Done()
		return nil
	}
	h, err := openHierarchy(o)
	if err != nil {
		return err
	}
	var only []device.Device // nil: every device
	what := "every device"
	if !o.Reset.AllDevices {
		resolver := device.Resolver{ProcRoot: o.ProcRoot}
		disk, err := resolver.DataDisk(o.DataSettings())
		if err != nil {
			return fmt.Errorf("resolving the data disk (--data-mount %q, --data-devices %q, --data-allow-root-disk=%t): %w; to clear the limits of every device instead, run reset --all-devices",
				o.DataMount, o.DataDevices, o.DataAllowRootDisk, err)
		}
		only, what = disk.Devices, "the data disk "+disk.String()
	}
	res, err := resetTree(h, only, out)
	switch {
	case errors.Is(err, os.ErrNotExist):
		fmt.Fprintf(out, "reset: no kubepods cgroup under %s: nothing to clear\n", h.Dir())
	case err != nil:
		return fmt.Errorf("reset: %w", err)
	case res.cleared == 0:
		fmt.Fprintf(out, "reset: nothing to clear on %s in %d cgroups at and below kubepods (%s)\n", what, res.cgroups, h.Dir())
	default:
		fmt.Fprintf(out, "reset: cleared the limits on %s in %d of %d cgroups at and below kubepods (%s)\n", what, res.cleared, res.cgroups, h.Dir())
	}
	log.Info("reset done", "devices", what, "cgroups", res.cgroups, "cleared", res.cleared)
	return nil
}

type resetResult struct{ cgroups, cleared int }

// resetTree clears the limits of the devices only (every device when nil)
// from every cgroup at and below kubepods, one line to out per cgroup
// cleared. Cgroups that vanish meanwhile (exited containers) are skipped;
// other failures do not stop the rest and are returned joined.
func resetTree(h *cgroup.Hierarchy, only []device.Device, out io.Writer) (resetResult, error) {
	var res resetResult
	dirs, err := h.KubepodsTree()
	if err != nil {
		return res, err
	}
	var errs []error
	for _, dir := range dirs {
		res.cgroups++
		current, err := h.Read(dir)
		switch {
		case errors.Is(err, cgroup.ErrCgroupGone):
			continue
		case errors.Is(err, os.ErrNotExist):
			continue // the io controller is not enabled here (cgroup v2): no limits
		case err != nil:
			errs = append(errs, err)
			continue
		}
		var devs []device.Device
		for d := range current {
			if only == nil || slices.Contains(only, d) {
				devs = append(devs, d)
			}
		}
		if len(devs) == 0 {
			continue
		}
		slices.SortFunc(devs, func(a, b device.Device) int {
			return cmp.Or(cmp.Compare(a.Major, b.Major), cmp.Compare(a.Minor, b.Minor))
		})
		changed, err := h.Clear(dir, devs)
		if errors.Is(err, cgroup.ErrCgroupGone) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if changed {
			res.cleared++
			for _, d := range devs {
				fmt.Fprintf(out, "cleared %s (%s) from %s\n", d, current[d], dir)
			}
		}
	}
	return res, errors.Join(errs...)
}
