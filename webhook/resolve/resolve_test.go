package resolve

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

const Mi = 1 << 20

// defaultConfig is the webhook's configuration with the SPEC's defaults.
func defaultConfig() *Config {
	c := &Config{
		ExcludeKeywords:   []string{"pause", "istio-proxy", "psmdb", "kube-system", "koordinator", "apisix"},
		ExcludeNamespaces: []string{"kube-system"},
	}
	c.Defaults.Set(limits.KeyIOPS, 500)
	return c
}

// excluding is defaultConfig with the pod exclusion selector.
func excluding(selector string) *Config {
	sel, err := labels.Parse(selector)
	if err != nil {
		panic(err)
	}
	c := defaultConfig()
	c.ExcludePodSelector = sel
	return c
}

func enabledNS(annotations ...string) *Namespace {
	return &Namespace{Name: "team-a", Labels: map[string]string{limits.EnabledLabel: "true"}, Annotations: kv(annotations)}
}

func kv(pairs []string) map[string]string {
	if len(pairs) == 0 {
		return nil
	}
	m := map[string]string{}
	for i := 0; i < len(pairs); i += 2 {
		m[pairs[i]] = pairs[i+1]
	}
	return m
}

// pod builds a pod with containers "app" (image example/app) and "sidecar"
// (image example/sidecar), and the given annotations.
func pod(annotations ...string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Annotations: kv(annotations)},
		Spec: corev1.PodSpec{Containers: []corev1.Container{
			{Name: "app", Image: "example/app:1"},
			{Name: "sidecar", Image: "example/sidecar:1"},
		}},
	}
}

func iops(r, w uint64) limits.Limits { return limits.Limits{ReadIOPS: r, WriteIOPS: w} }

func TestResolve(t *testing.T) {
	def := iops(500, 500)
	tests := map[string]struct {
		config *Config
		ns     *Namespace
		pod    *corev1.Pod
		// want is the resolved annotation; nil with wantMutate false means untouched.
		want       limits.Resolved
		wantMutate bool
		// wantScope is InScope unless said otherwise.
		wantScope Scope
		// wantWarnings and wantErrors are substrings, one per warning/error, in order.
		wantWarnings []string
		wantErrors   []string
	}{
		"leaves a pod alone in a namespace without the opt-in label": {
			ns: &Namespace{Name: "other"}, pod: pod(limits.Prefix+"iops", "garbage"), wantScope: NotEnabled,
		},
		"leaves a pod alone when the opt-in label is not exactly true": {
			ns:  &Namespace{Name: "other", Labels: map[string]string{limits.EnabledLabel: "yes"}},
			pod: pod(), wantScope: NotEnabled,
		},
		"leaves a pod alone in an excluded namespace even when it is labelled": {
			ns:  &Namespace{Name: "kube-system", Labels: map[string]string{limits.EnabledLabel: "true"}},
			pod: pod(), wantScope: ExcludedNamespace,
		},
		"gives every container the webhook defaults in an enabled namespace": {
			ns: enabledNS(), pod: pod(), wantMutate: true,
			want: limits.Resolved{"app": def, "sidecar": def},
		},
		"lets a specific webhook default beat the combined one": {
			config: func() *Config {
				c := defaultConfig()
				c.Defaults.Set(limits.KeyReadIOPS, 100)
				c.Defaults.Set(limits.KeyWriteBPS, 10*Mi)
				return c
			}(),
			ns: enabledNS(), pod: pod(), wantMutate: true,
			want: limits.Resolved{"app": {ReadIOPS: 100, WriteIOPS: 500, WriteBPS: 10 * Mi}, "sidecar": {ReadIOPS: 100, WriteIOPS: 500, WriteBPS: 10 * Mi}},
		},
		"lets namespace annotations beat the webhook defaults": {
			ns: enabledNS(limits.Prefix+"iops", "300", limits.Prefix+"bps", "20Mi"), pod: pod(), wantMutate: true,
			want: limits.Resolved{
				"app":     {ReadIOPS: 300, WriteIOPS: 300, ReadBPS: 20 * Mi, WriteBPS: 20 * Mi},
				"sidecar": {ReadIOPS: 300, WriteIOPS: 300, ReadBPS: 20 * Mi, WriteBPS: 20 * Mi},
			},
		},
		"lets a namespace's combined key beat a specific webhook default": {
			config: func() *Config { c := defaultConfig(); c.Defaults.Set(limits.KeyReadIOPS, 100); return c }(),
			ns:     enabledNS(limits.Prefix+"iops", "300"), pod: pod(), wantMutate: true,
			want: limits.Resolved{"app": iops(300, 300), "sidecar": iops(300, 300)},
		},
		"lets a namespace's specific key beat its combined key": {
			ns: enabledNS(limits.Prefix+"iops", "300", limits.Prefix+"write-iops", "50"), pod: pod(), wantMutate: true,
			want: limits.Resolved{"app": iops(300, 50), "sidecar": iops(300, 50)},
		},
		"lets pod annotations beat the namespace for every container": {
			ns:  enabledNS(limits.Prefix+"iops", "300"),
			pod: pod(limits.Prefix+"iops", "800", limits.Prefix+"read-bps", "1Mi"), wantMutate: true,
			want: limits.Resolved{"app": {ReadIOPS: 800, WriteIOPS: 800, ReadBPS: Mi}, "sidecar": {ReadIOPS: 800, WriteIOPS: 800, ReadBPS: Mi}},
		},
		"lets a pod's specific key beat its combined key": {
			ns: enabledNS(), pod: pod(limits.Prefix+"iops", "800", limits.Prefix+"read-iops", "100"), wantMutate: true,
			want: limits.Resolved{"app": iops(100, 800), "sidecar": iops(100, 800)},
		},
		"reads unlimited on the pod as no limit over a namespace default": {
			ns: enabledNS(limits.Prefix+"iops", "300"), pod: pod(limits.Prefix+"write-iops", "unlimited"), wantMutate: true,
			want: limits.Resolved{"app": iops(300, 0), "sidecar": iops(300, 0)},
		},
		"reads 0 on the pod as no limit over the webhook default": {
			ns: enabledNS(), pod: pod(limits.Prefix+"iops", "0"), wantMutate: true,
			want: limits.Resolved{"app": iops(0, 0), "sidecar": iops(0, 0)},
		},
		"lets a per-container annotation beat the pod for that container only": {
			ns: enabledNS(),
			pod: pod(limits.Prefix+"iops", "800",
				limits.ContainerAnnotationPrefix+"app", "read-iops=1000,write-iops=200,read-bps=50Mi"),
			wantMutate: true,
			want:       limits.Resolved{"app": {ReadIOPS: 1000, WriteIOPS: 200, ReadBPS: 50 * Mi}, "sidecar": iops(800, 800)},
		},
		"lets a per-container combined key beat a pod's specific key": {
			ns:         enabledNS(),
			pod:        pod(limits.Prefix+"read-iops", "100", limits.ContainerAnnotationPrefix+"app", "iops=700"),
			wantMutate: true,
			want:       limits.Resolved{"app": iops(700, 700), "sidecar": iops(100, 500)},
		},
		"lets a per-container specific key beat its combined key, in any order": {
			ns:         enabledNS(),
			pod:        pod(limits.ContainerAnnotationPrefix+"app", " write-iops = 5 , iops=700 "),
			wantMutate: true,
			want:       limits.Resolved{"app": iops(700, 5), "sidecar": def},
		},
		"clamps a pod override above the namespace ceiling and says so": {
			ns:  enabledNS(limits.MaxIOPSAnnotation, "1000"),
			pod: pod(limits.Prefix+"read-iops", "2000", limits.Prefix+"write-iops", "900"), wantMutate: true,
			want: limits.Resolved{"app": iops(1000, 900), "sidecar": iops(1000, 900)},
			wantWarnings: []string{
				`container "app": clamped to the ceilings of namespace "team-a": read-iops 2000 to 1000`,
				`container "sidecar": clamped to the ceilings of namespace "team-a": read-iops 2000 to 1000`,
			},
		},
		"clamps unlimited to the ceiling": {
			ns:  enabledNS(limits.MaxIOPSAnnotation, "1000", limits.MaxBPSAnnotation, "100Mi"),
			pod: pod(limits.ContainerAnnotationPrefix+"app", "iops=unlimited"), wantMutate: true,
			want: limits.Resolved{
				"app":     {ReadIOPS: 1000, WriteIOPS: 1000, ReadBPS: 100 * Mi, WriteBPS: 100 * Mi},
				"sidecar": {ReadIOPS: 500, WriteIOPS: 500, ReadBPS: 100 * Mi, WriteBPS: 100 * Mi},
			},
			wantWarnings: []string{
				`container "app": clamped to the ceilings of namespace "team-a": read-iops unlimited to 1000, write-iops unlimited to 1000, read-bps unlimited to 100Mi, write-bps unlimited to 100Mi`,
				`container "sidecar": clamped to the ceilings of namespace "team-a": read-bps unlimited to 100Mi, write-bps unlimited to 100Mi`,
			},
		},
		"clamps a namespace default above its own ceiling": {
			ns: enabledNS(limits.Prefix+"iops", "5000", limits.MaxIOPSAnnotation, "1000"), pod: pod(), wantMutate: true,
			want:         limits.Resolved{"app": iops(1000, 1000), "sidecar": iops(1000, 1000)},
			wantWarnings: []string{"write-iops 5000 to 1000", "write-iops 5000 to 1000"},
		},
		"reads a ceiling of unlimited as no ceiling": {
			ns: enabledNS(limits.MaxIOPSAnnotation, "unlimited"), pod: pod(limits.Prefix+"iops", "9000"), wantMutate: true,
			want: limits.Resolved{"app": iops(9000, 9000), "sidecar": iops(9000, 9000)},
		},
		"ignores an invalid namespace annotation with a warning and uses the next level": {
			ns: enabledNS(limits.Prefix+"read-iops", "fast", limits.Prefix+"iops", "300"), pod: pod(), wantMutate: true,
			want:         limits.Resolved{"app": iops(300, 300), "sidecar": iops(300, 300)},
			wantWarnings: []string{`namespace "team-a": ignoring invalid annotation kubediskguard.io/read-iops="fast"`},
		},
		"ignores an invalid namespace ceiling with a warning": {
			ns: enabledNS(limits.MaxBPSAnnotation, "-5"), pod: pod(), wantMutate: true,
			want:         limits.Resolved{"app": def, "sidecar": def},
			wantWarnings: []string{`namespace "team-a": ignoring invalid annotation kubediskguard.io/max-bps="-5"`},
		},
		"denies an invalid pod value naming the key and the value": {
			ns: enabledNS(), pod: pod(limits.Prefix+"write-iops", "1.5"),
			wantErrors: []string{`metadata.annotations[kubediskguard.io/write-iops]: Invalid value: "1.5"`},
		},
		"denies an unknown key inside a per-container value": {
			ns: enabledNS(), pod: pod(limits.ContainerAnnotationPrefix+"app", "read-iops=5,speed=9"),
			wantErrors: []string{`metadata.annotations[container.kubediskguard.io/app]: Invalid value: "read-iops=5,speed=9": unknown key "speed"`},
		},
		"denies a per-container annotation naming a container the pod does not have": {
			ns: enabledNS(), pod: pod(limits.ContainerAnnotationPrefix+"db", "iops=5"),
			wantErrors: []string{`metadata.annotations[container.kubediskguard.io/db]: Invalid value: "iops=5": the pod has no container or init container named "db"`},
		},
		"denies an empty per-container value and a key given twice": {
			ns: enabledNS(), pod: pod(limits.ContainerAnnotationPrefix+"app", "", limits.ContainerAnnotationPrefix+"sidecar", "iops=1,iops=2"),
			wantErrors: []string{`container.kubediskguard.io/app]: Invalid value: "": is empty`, `container.kubediskguard.io/sidecar]: Invalid value: "iops=1,iops=2": key "iops" is given twice`},
		},
		"reports every problem, not only the first": {
			ns: enabledNS(),
			pod: pod(limits.Prefix+"bps", "lots", limits.Prefix+"iops", "-3",
				limits.ContainerAnnotationPrefix+"app", "read-iops=x,write-bps=1.5,colour=red,novalue"),
			wantErrors: []string{
				`container.kubediskguard.io/app]: Invalid value: "read-iops=x,write-bps=1.5,colour=red,novalue": read-iops="x"`,
				`write-bps="1.5"`,
				`unknown key "colour"`,
				`"novalue" is not a key=value pair`,
				`kubediskguard.io/bps]: Invalid value: "lots"`,
				`kubediskguard.io/iops]: Invalid value: "-3"`,
			},
		},
		"limits init containers like regular containers": {
			ns: enabledNS(),
			pod: func() *corev1.Pod {
				p := pod(limits.ContainerAnnotationPrefix+"migrate", "write-iops=10")
				p.Spec.InitContainers = []corev1.Container{{Name: "migrate", Image: "example/migrate"}}
				return p
			}(),
			wantMutate: true,
			want:       limits.Resolved{"migrate": iops(500, 10), "app": def, "sidecar": def},
		},
		"does not limit ephemeral containers": {
			ns: enabledNS(),
			pod: func() *corev1.Pod {
				p := pod()
				p.Spec.EphemeralContainers = []corev1.EphemeralContainer{{EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: "debugger", Image: "busybox"}}}
				return p
			}(),
			wantMutate: true,
			want:       limits.Resolved{"app": def, "sidecar": def},
		},
		"leaves out a container whose name or image contains an excluded keyword": {
			ns: enabledNS(),
			pod: func() *corev1.Pod {
				p := pod()
				p.Spec.Containers = append(p.Spec.Containers,
					corev1.Container{Name: "istio-proxy", Image: "docker.io/istio/proxyv2:1.20"},
					corev1.Container{Name: "gateway", Image: "registry.example/apisix/apisix:3"})
				return p
			}(),
			wantMutate: true,
			want:       limits.Resolved{"app": def, "sidecar": def},
		},
		"accepts an override for an excluded container but still leaves it out": {
			ns: enabledNS(),
			pod: func() *corev1.Pod {
				p := pod(limits.ContainerAnnotationPrefix+"istio-proxy", "iops=5")
				p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "istio-proxy", Image: "proxyv2"})
				return p
			}(),
			wantMutate: true,
			want:       limits.Resolved{"app": def, "sidecar": def},
		},
		"gives a pod matching the exclusion selector no limits, replacing any it carries": {
			config: excluding("app=db"),
			ns:     enabledNS(),
			pod: func() *corev1.Pod {
				p := pod(limits.Prefix+"iops", "not even valid")
				p.Labels = map[string]string{"app": "db"}
				return p
			}(),
			wantMutate: true,
			want:       limits.Resolved{},
		},
		"limits a pod that does not match the exclusion selector": {
			config: excluding("app in (db),tier!=infra"),
			ns:     enabledNS(),
			pod: func() *corev1.Pod {
				p := pod()
				p.Labels = map[string]string{"app": "db", "tier": "infra"}
				return p
			}(),
			wantMutate: true,
			want:       limits.Resolved{"app": def, "sidecar": def},
		},
		"warns about a prefixed pod annotation that is not a setting": {
			ns: enabledNS(), pod: pod(limits.MaxIOPSAnnotation, "10", limits.ResolvedAnnotation, `{"app":{}}`), wantMutate: true,
			want:         limits.Resolved{"app": def, "sidecar": def},
			wantWarnings: []string{"pod annotation kubediskguard.io/max-iops is not a per-pod KubeDiskGuard setting"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			c := tc.config
			if c == nil {
				c = defaultConfig()
			}
			got := c.Resolve(tc.ns, tc.pod)
			if got.Mutate != tc.wantMutate {
				t.Errorf("Mutate = %v, want %v (reason %q)", got.Mutate, tc.wantMutate, got.Reason)
			}
			if got.Scope != tc.wantScope {
				t.Errorf("Scope = %v, want %v (reason %q)", got.Scope, tc.wantScope, got.Reason)
			}
			if !reflect.DeepEqual(got.Limits, tc.want) {
				t.Errorf("Limits = %v\nwant     %v", got.Limits, tc.want)
			}
			matchAll(t, "warning", got.Messages(), tc.wantWarnings)
			var errs []string
			for _, e := range got.Errors {
				errs = append(errs, e.Error())
			}
			matchAll(t, "error", errs, tc.wantErrors)
		})
	}
}

// matchAll checks that got has one entry per want, each containing it.
func matchAll(t *testing.T, what string, got, want []string) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("got %d %ss, want %d:\n%s", len(got), what, len(want), strings.Join(got, "\n"))
		return
	}
	for i := range want {
		if !strings.Contains(got[i], want[i]) {
			t.Errorf("%s %d = %q\nwant it to contain %q", what, i, got[i], want[i])
		}
	}
}
