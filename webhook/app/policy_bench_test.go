package app_test

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// benchPods is the size of the namespace BenchmarkPolicy500Pods re-resolves.
const benchPods = 500

// BenchmarkPolicy500Pods: one namespace of 500 pods (envtest: they are
// stored, not run) re-resolved by the webhook binary's policy controller
// after a change of the namespace's default, measured from the namespace
// update to the end of the controller's pass (its log line), with the pod
// writes its client sent counted on the wire. Baseline in the same run: the
// same 500 pods already up to date (a namespace change that resolves to the
// same limits: zero writes). The changed pass runs at the default write rate
// (20/s: the limit shapes it) and unlimited (the API server does).
//
//	make bench-policy
func BenchmarkPolicy500Pods(b *testing.B) {
	p := controlPlane(b)
	cs, _ := p.clientset(b)
	isolatedNamespace(b, cs, benchNS)
	for i := range benchPods {
		createPod(b, cs, benchNS, testPod(fmt.Sprintf("pod-%03d", i), nil, "app", "sidecar"))
	}
	// Opted in with all 500 stamped at 500 IOPS before any measurement.
	setNamespace(b, cs, benchNS, func(ns *corev1.Namespace) { optIn(ns); ns.Annotations[limits.Prefix+"iops"] = "500" })

	iops := 500
	for _, bc := range []struct {
		name string
		args []string
	}{
		{"rate=20/s(default)", nil},
		{"rate=unlimited", []string{"--policy-writes-per-second=1000000"}},
	} {
		r := startPolicyRun(b, p, bc.name, append([]string{"--leader-election-namespace=" + p.leaseNamespace(b)}, bc.args...)...)
		eventually(b, 30*time.Second, bc.name+" leading", func() error {
			if !r.leads() {
				return fmt.Errorf("not yet")
			}
			return nil
		})
		// Its pass at start brings every pod to the current policy.
		r.waitPasses(b, 1)
		waitAllStamped(b, cs, iops)

		b.Run(bc.name+"/changed", func(b *testing.B) {
			for range b.N {
				iops = 700 - iops // 500 ↔ 200: every pod's stamp changes
				pass := r.timePass(b, cs, fmt.Sprintf("%d", iops), "")
				if pass.writes != benchPods {
					b.Errorf("%d pod writes for %d changed pods, want one each", pass.writes, benchPods)
				}
				pass.report(b)
			}
		})
		b.Run(bc.name+"/unchanged(baseline)", func(b *testing.B) {
			for range b.N {
				// read-iops equal to iops: a change of the namespace that
				// resolves every pod to the limits it has.
				pass := r.timePass(b, cs, fmt.Sprintf("%d", iops), fmt.Sprintf("%d", iops))
				if pass.writes != 0 {
					b.Errorf("%d pod writes for %d up-to-date pods, want 0", pass.writes, benchPods)
				}
				pass.report(b)
				n := r.passes()
				setNamespace(b, cs, benchNS, func(ns *corev1.Namespace) { delete(ns.Annotations, limits.Prefix+"read-iops") })
				r.waitPasses(b, n+1) // that change's pass: nothing to change either
			}
		})
		r.halt(b)
	}
}

// passResult is one measured pass.
type passResult struct {
	took, controller time.Duration // namespace update → pass logged; the controller's own duration
	writes           int
}

func (p passResult) report(b *testing.B) {
	b.ReportMetric(p.took.Seconds(), "s/pass")
	b.ReportMetric(p.controller.Seconds(), "controller-s/pass")
	b.ReportMetric(float64(p.writes), "writes/pass")
}

var passLine = regexp.MustCompile(`"msg"="namespace re-resolved[^"]*".*"name"="` + benchNS + `".*"duration"="([^"]+)"`)

// passes counts the controller's logged passes over benchNS.
func (r *policyRun) passes() int { return len(passLine.FindAllString(r.log.String(), -1)) }

// waitPasses waits until n passes over benchNS are logged and returns the
// last one's duration.
func (r *policyRun) waitPasses(b *testing.B, n int) time.Duration {
	b.Helper()
	var d time.Duration
	eventually(b, 2*time.Minute, "the controller's pass", func() error {
		m := passLine.FindAllStringSubmatch(r.log.String(), -1)
		if len(m) < n {
			return fmt.Errorf("%d passes logged, want %d", len(m), n)
		}
		var err error
		d, err = time.ParseDuration(m[n-1][1])
		return err
	})
	return d
}

// timePass sets the namespace's iops (and read-iops, unless empty) and
// measures the controller's pass that follows.
func (r *policyRun) timePass(b *testing.B, cs kubernetes.Interface, iops, readIOPS string) passResult {
	b.Helper()
	before, writes := r.passes(), len(r.writesIn(benchNS))
	start := time.Now()
	setNamespace(b, cs, benchNS, func(ns *corev1.Namespace) {
		ns.Annotations[limits.Prefix+"iops"] = iops
		if readIOPS != "" {
			ns.Annotations[limits.Prefix+"read-iops"] = readIOPS
		}
	})
	d := r.waitPasses(b, before+1)
	return passResult{took: time.Since(start), controller: d, writes: len(r.writesIn(benchNS)) - writes}
}

// waitAllStamped waits until every pod of benchNS is stamped at iops.
func waitAllStamped(b *testing.B, cs kubernetes.Interface, iops int) {
	b.Helper()
	l := limits.Limits{ReadIOPS: uint64(iops), WriteIOPS: uint64(iops)}
	want := limits.Resolved{"app": l, "sidecar": l}.Encode()
	eventually(b, 2*time.Minute, "all pods stamped", func() error {
		list, err := cs.CoreV1().Pods(benchNS).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			return err
		}
		var behind []string
		for _, p := range list.Items {
			if p.Annotations[limits.ResolvedAnnotation] != want {
				behind = append(behind, p.Name)
			}
		}
		if len(list.Items) != benchPods || len(behind) > 0 {
			return fmt.Errorf("%d pods, %d not stamped %s: %s", len(list.Items), len(behind), want, strings.Join(behind[:min(5, len(behind))], " "))
		}
		return nil
	})
}
