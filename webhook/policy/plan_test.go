package policy

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/webhook/resolve"
)

func config() *resolve.Config {
	c := &resolve.Config{ExcludeKeywords: []string{"istio-proxy"}, ExcludeNamespaces: []string{"kube-system"},
		ExcludePodSelector: labels.SelectorFromSet(labels.Set{"db": "true"})}
	c.Defaults.Set(limits.KeyIOPS, 500)
	return c
}

func enabled(name string, annotations ...string) *resolve.Namespace {
	ns := &resolve.Namespace{Name: name, Labels: map[string]string{limits.EnabledLabel: "true"}, Annotations: map[string]string{}}
	for i := 0; i+1 < len(annotations); i += 2 {
		ns.Annotations[annotations[i]] = annotations[i+1]
	}
	return ns
}

func pod(annotations ...string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Annotations: map[string]string{}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "example/app"}, {Name: "istio-proxy", Image: "istio/proxyv2"}}}}
	for i := 0; i+1 < len(annotations); i += 2 {
		p.Annotations[annotations[i]] = annotations[i+1]
	}
	return p
}

func TestPlanFor(t *testing.T) {
	at500 := limits.Resolved{"app": {ReadIOPS: 500, WriteIOPS: 500}}.Encode()
	at300 := limits.Resolved{"app": {ReadIOPS: 300, WriteIOPS: 300}}.Encode()
	tests := map[string]struct {
		ns        *resolve.Namespace
		pod       *corev1.Pod
		want      action
		wantValue string
	}{
		"stamps an unstamped pod of an enabled namespace with the webhook's resolution": {
			ns: enabled("team"), pod: pod(), want: stamp, wantValue: at500,
		},
		"stamps again when the namespace's defaults changed": {
			ns: enabled("team", limits.Prefix+"iops", "300"), pod: pod(limits.ResolvedAnnotation, at500), want: stamp, wantValue: at300,
		},
		"applies the namespace's ceiling": {
			ns: enabled("team", limits.MaxIOPSAnnotation, "300"), pod: pod(limits.ResolvedAnnotation, at500), want: stamp, wantValue: at300,
		},
		"keeps a stamp that already holds the resolution": {
			ns: enabled("team"), pod: pod(limits.ResolvedAnnotation, at500), want: keep,
		},
		"keeps pod overrides as the webhook does": {
			ns: enabled("team"), pod: pod(limits.Prefix+"iops", "300", limits.ResolvedAnnotation, at300), want: keep,
		},
		"replaces a forged stamp": {
			ns: enabled("team"), pod: pod(limits.ResolvedAnnotation, `{"app":{}}`), want: stamp, wantValue: at500,
		},
		"stamps no limits on a pod the exclusion selector matches": {
			ns: enabled("team"), pod: func() *corev1.Pod { p := pod(); p.Labels = map[string]string{"db": "true"}; return p }(),
			want: stamp, wantValue: "{}",
		},
		"clears the stamp of a pod whose namespace opted out": {
			ns: &resolve.Namespace{Name: "team"}, pod: pod(limits.ResolvedAnnotation, at500), want: clear,
		},
		"leaves an unstamped pod of a namespace that did not opt in alone": {
			ns: &resolve.Namespace{Name: "team"}, pod: pod(limits.Prefix+"iops", "garbage"), want: keep,
		},
		"never changes a pod of an excluded namespace, labelled or not, stamped or not": {
			ns: enabled("kube-system"), pod: pod(limits.ResolvedAnnotation, `{"app":{}}`), want: keep,
		},
		"leaves a terminating pod alone": {
			ns: enabled("team"), pod: func() *corev1.Pod { p := pod(); p.DeletionTimestamp = &metav1.Time{}; return p }(), want: done,
		},
		"leaves a finished pod alone": {
			ns: enabled("team"), pod: func() *corev1.Pod { p := pod(); p.Status.Phase = corev1.PodSucceeded; return p }(), want: done,
		},
		"leaves a failed pod's stamp in a namespace that opted out": {
			ns: &resolve.Namespace{Name: "team"},
			pod: func() *corev1.Pod {
				p := pod(limits.ResolvedAnnotation, at500)
				p.Status.Phase = corev1.PodFailed
				return p
			}(),
			want: done,
		},
		"reports a pod whose own annotations are invalid, writing nothing": {
			ns: enabled("team"), pod: pod(limits.Prefix+"iops", "lots"), want: invalid,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			p := planFor(config(), tc.ns, tc.pod)
			if p.action != tc.want || p.value != tc.wantValue {
				t.Fatalf("plan = action %d value %q, want action %d value %q", p.action, p.value, tc.want, tc.wantValue)
			}
			if tc.want == invalid && len(p.res.Errors) == 0 {
				t.Error("an invalid plan carries no errors to report")
			}
		})
	}
}

func TestPolicyChanged(t *testing.T) {
	ns := func(lbl map[string]string, ann map[string]string) *metav1.ObjectMeta {
		return &metav1.ObjectMeta{Labels: lbl, Annotations: ann}
	}
	on := map[string]string{limits.EnabledLabel: "true"}
	tests := map[string]struct {
		old, new *metav1.ObjectMeta
		want     bool
	}{
		"an opt-in is a change":         {ns(nil, nil), ns(on, nil), true},
		"an opt-out is a change":        {ns(on, nil), ns(map[string]string{limits.EnabledLabel: "false"}, nil), true},
		"a new default is a change":     {ns(on, nil), ns(on, map[string]string{limits.Prefix + "iops": "5"}), true},
		"a changed ceiling is a change": {ns(on, map[string]string{limits.MaxBPSAnnotation: "1Mi"}), ns(on, map[string]string{limits.MaxBPSAnnotation: "2Mi"}), true},
		"a removed default is a change": {ns(on, map[string]string{limits.Prefix + "iops": "5"}), ns(on, map[string]string{}), true},
		"other labels and annotations are not": {
			ns(on, map[string]string{"owner": "a"}), ns(map[string]string{limits.EnabledLabel: "true", "team": "x"}, map[string]string{"owner": "b"}), false,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := policyChanged(tc.old, tc.new); got != tc.want {
				t.Errorf("policyChanged = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestSlimPodKeepsWhatResolutionReads(t *testing.T) {
	full := pod(limits.Prefix+"iops", "300")
	full.Namespace, full.UID, full.ResourceVersion = "team", "u1", "7"
	full.Labels = map[string]string{"db": "true"}
	full.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}
	full.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "A", Value: "b"}}
	full.Spec.InitContainers = []corev1.Container{{Name: "init", Image: "example/init", Args: []string{"x"}}}
	full.Spec.Volumes = []corev1.Volume{{Name: "v"}}
	full.Status.Phase = corev1.PodRunning
	full.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "app"}}

	got, err := slimPod(full)
	if err != nil {
		t.Fatal(err)
	}
	slim := got.(*corev1.Pod)
	if slim.ManagedFields != nil || slim.Spec.Volumes != nil || slim.Status.ContainerStatuses != nil || slim.Spec.Containers[0].Env != nil || slim.Spec.InitContainers[0].Args != nil {
		t.Errorf("slim pod keeps what nothing reads: %+v", slim)
	}
	if slim.Name != "p" || slim.Namespace != "team" || slim.UID != "u1" || slim.ResourceVersion != "7" || slim.Status.Phase != corev1.PodRunning {
		t.Errorf("slim pod lost its identity or phase: %+v", slim.ObjectMeta)
	}
	ns := enabled("team")
	if a, b := planFor(config(), ns, full), planFor(config(), ns, slim); a.action != b.action || a.value != b.value {
		t.Errorf("the slim pod plans %+v, the full pod %+v", b, a)
	}
}
