package mutate

import (
	"context"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// realisticPod is a Deployment-made pod with three containers (app, a log
// shipper, a proxy that is excluded), env, mounts, probes, resources, and a
// few KubeDiskGuard annotations among others.
func realisticPod() *corev1.Pod {
	res := corev1.ResourceRequirements{
		Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("250m"), corev1.ResourceMemory: resource.MustParse("256Mi")},
		Limits:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("512Mi")},
	}
	probe := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(8080)}}, PeriodSeconds: 10}
	ctr := func(name, image string) corev1.Container {
		return corev1.Container{
			Name: name, Image: image, Resources: res, LivenessProbe: probe, ReadinessProbe: probe,
			Ports:        []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
			Env:          []corev1.EnvVar{{Name: "LOG_LEVEL", Value: "info"}, {Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
			VolumeMounts: []corev1.VolumeMount{{Name: "data", MountPath: "/data"}, {Name: "kube-api-access", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true}},
		}
	}
	return &corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: "web-6c5f7d9b8-",
			Labels:       map[string]string{"app": "web", "pod-template-hash": "6c5f7d9b8", "tier": "frontend"},
			Annotations: map[string]string{
				limits.Prefix + "iops":                   "800",
				limits.Prefix + "write-bps":              "50Mi",
				limits.ContainerAnnotationPrefix + "app": "read-iops=1200,write-iops=300",
				"prometheus.io/scrape":                   "true",
				"kubectl.kubernetes.io/restartedAt":      "2026-11-01T10:00:00Z",
			},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "web-6c5f7d9b8", UID: "7d0c1d2e-1111-2222-3333-444455556666"}},
		},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{ctr("app", "registry.example/web/app:1.4.2"), ctr("log-shipper", "registry.example/fluent-bit:3.0"), ctr("istio-proxy", "docker.io/istio/proxyv2:1.20.0")},
			Volumes: []corev1.Volume{
				{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
				{Name: "kube-api-access", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{}}},
			},
			ServiceAccountName: "web",
			Tolerations:        []corev1.Toleration{{Key: "node.kubernetes.io/not-ready", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute}},
		},
	}
}

// BenchmarkHandle measures resolution plus the whole handler (decode, resolve,
// encode, patch) on a realistic pod; BenchmarkNoopHandle is the baseline of a
// handler that only allows.
func BenchmarkHandle(b *testing.B) {
	h := testHandler(namespaces())
	req := podRequest(b, admissionv1.Create, "team-a", realisticPod())
	ctx := context.Background()
	if resp := h.Handle(ctx, req); !resp.Allowed || len(resp.Patches) == 0 {
		b.Fatalf("benchmark pod was not stamped: %+v", resp.Result)
	}
	b.ReportAllocs()
	for b.Loop() {
		h.Handle(ctx, req)
	}
}

func BenchmarkNoopHandle(b *testing.B) {
	h := admission.HandlerFunc(func(context.Context, admission.Request) admission.Response { return admission.Allowed("") })
	req := podRequest(b, admissionv1.Create, "team-a", realisticPod())
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		h.Handle(ctx, req)
	}
}

func BenchmarkResolve(b *testing.B) {
	h := testHandler(namespaces())
	ns, _ := namespaces().Namespace(context.Background(), "team-a")
	pod := realisticPod()
	b.ReportAllocs()
	for b.Loop() {
		h.Resolver.Resolve(ns, pod)
	}
}
