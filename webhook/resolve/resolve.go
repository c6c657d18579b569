// Package resolve decides the IO limits of each container of a pod from the
// webhook's defaults, the pod's namespace and the pod itself, with the
// precedence, ceilings and exclusions of the KubeDiskGuard contract. It is
// pure: no I/O, no clock, the same input always gives the same result.
package resolve

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// Config is the webhook-wide part of resolution.
type Config struct {
	// Defaults apply below the namespace level (CONTAINER_*_LIMIT).
	Defaults Settings
	// ExcludeKeywords: a container whose name or image contains one of them
	// gets no limit.
	ExcludeKeywords []string
	// ExcludeNamespaces are never changed, whatever their labels.
	ExcludeNamespaces []string
	// ExcludePodSelector matches pods that get no limits; nil matches none.
	ExcludePodSelector labels.Selector
}

// WarningKind says what a warning is about.
type WarningKind string

const (
	// WarnClamp: a value was capped by a namespace ceiling.
	WarnClamp WarningKind = "clamp"
	// WarnNamespace: an invalid namespace annotation was ignored.
	WarnNamespace WarningKind = "namespace"
	// WarnPod: a pod annotation with the KubeDiskGuard prefix is not a setting.
	WarnPod WarningKind = "pod"
)

// WarningKinds lists every kind of warning.
var WarningKinds = []WarningKind{WarnClamp, WarnNamespace, WarnPod}

// Warning is an admission warning for the client.
type Warning struct {
	Kind    WarningKind
	Message string
}

// Messages returns the warnings' messages.
func (r *Result) Messages() []string {
	if len(r.Warnings) == 0 {
		return nil
	}
	m := make([]string, len(r.Warnings))
	for i, w := range r.Warnings {
		m[i] = w.Message
	}
	return m
}

// Namespace is what resolution needs of a pod's namespace.
type Namespace struct {
	Name        string
	Labels      map[string]string
	Annotations map[string]string
}

// Scope says whether a pod's namespace is one whose pods KubeDiskGuard
// stamps.
type Scope uint8

const (
	// InScope: the namespace opted in and is not excluded; its pods are
	// resolved and stamped.
	InScope Scope = iota
	// ExcludedNamespace: the namespace is in ExcludeNamespaces; its pods are
	// never changed, whatever their labels or annotations.
	ExcludedNamespace
	// NotEnabled: the namespace did not opt in; its pods carry no resolved
	// annotation (the webhook is not called for them; the policy controller
	// removes a stamp left from before an opt-out).
	NotEnabled
)

// Result is the decision for one pod.
type Result struct {
	// Scope is whether the pod's namespace is in scope at all; when it is
	// not, Mutate is false.
	Scope Scope
	// Mutate is false when the pod must be left exactly as it is.
	Mutate bool
	// Reason says why the pod is left alone or gets no limits, for logs.
	Reason string
	// Limits is the value of the resolved annotation when Mutate is true.
	Limits limits.Resolved
	// Warnings go back to the client: clamps and ignored settings.
	Warnings []Warning
	// Errors are problems with the pod's own annotations: the pod is denied.
	Errors field.ErrorList
}

var annotationsPath = field.NewPath("metadata", "annotations")

// Resolve decides the limits of every container of pod, which is in (or is
// being created in) namespace ns.
func (c *Config) Resolve(ns *Namespace, pod *corev1.Pod) Result {
	switch c.ScopeOf(ns) {
	case ExcludedNamespace:
		return Result{Scope: ExcludedNamespace, Reason: "namespace is excluded"}
	case NotEnabled:
		return Result{Scope: NotEnabled, Reason: "namespace is not enabled"}
	}
	if c.ExcludePodSelector != nil && c.ExcludePodSelector.Matches(labels.Set(pod.Labels)) {
		return Result{Mutate: true, Reason: "pod matches the exclusion selector", Limits: limits.Resolved{}}
	}

	var res Result
	nsLevel, ceil := parseNamespace(ns, &res.Warnings)
	podLevel, perContainer := parsePod(pod, &res.Errors, &res.Warnings)
	if len(res.Errors) > 0 {
		return res
	}

	res.Mutate = true
	res.Limits = make(limits.Resolved, len(pod.Spec.InitContainers)+len(pod.Spec.Containers))
	levels := [4]*Settings{nil, &podLevel, &nsLevel, &c.Defaults}
	for _, list := range [2][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for i := range list {
			ctr := &list[i]
			if c.excludedContainer(ctr) {
				continue
			}
			levels[0] = perContainer[ctr.Name]
			l, clamps := resolveContainer(levels[:], ceil)
			res.Limits[ctr.Name] = l
			if clamps != "" {
				res.Warnings = append(res.Warnings, Warning{WarnClamp, fmt.Sprintf("container %q: clamped to the ceilings of namespace %q: %s", ctr.Name, ns.Name, clamps)})
			}
		}
	}
	return res
}

// ScopeOf says whether the pods of ns are stamped: an excluded namespace
// never, else only when it opted in with the label's value exactly "true".
func (c *Config) ScopeOf(ns *Namespace) Scope {
	if slices.Contains(c.ExcludeNamespaces, ns.Name) {
		return ExcludedNamespace
	}
	if ns.Labels[limits.EnabledLabel] != "true" {
		return NotEnabled
	}
	return InScope
}

func (c *Config) excludedContainer(ctr *corev1.Container) bool {
	for _, kw := range c.ExcludeKeywords {
		if strings.Contains(ctr.Name, kw) || strings.Contains(ctr.Image, kw) {
			return true
		}
	}
	return false
}

// ceilings are a namespace's max-iops and max-bps; 0 means none.
type ceilings struct{ iops, bps uint64 }

func (c ceilings) of(d limits.Dimension) uint64 {
	if d.IsIOPS() {
		return c.iops
	}
	return c.bps
}

// resolveContainer takes, per dimension, the value of the first level that
// sets it (nil levels are skipped), then applies the ceilings. It also returns
// a description of what was clamped, empty when nothing was.
func resolveContainer(levels []*Settings, ceil ceilings) (limits.Limits, string) {
	var l limits.Limits
	var clamps []string
	for _, d := range limits.Dimensions {
		var v uint64
		for _, lvl := range levels {
			if lvl == nil {
				continue
			}
			if x, ok := lvl.lookup(d); ok {
				v = x
				break
			}
		}
		if max := ceil.of(d); max != 0 && (v == limits.Unlimited || v > max) {
			clamps = append(clamps, fmt.Sprintf("%s %s to %s", d, limits.FormatValue(d.IsIOPS(), v), limits.FormatValue(d.IsIOPS(), max)))
			v = max
		}
		l.Set(d, v)
	}
	return l, strings.Join(clamps, ", ")
}

// parseNamespace reads a namespace's defaults and ceilings. An invalid value
// is ignored (the next level applies) with a warning naming key and namespace.
func parseNamespace(ns *Namespace, warnings *[]Warning) (Settings, ceilings) {
	var s Settings
	var ceil ceilings
	warn := func(key, value string, err error) {
		*warnings = append(*warnings, Warning{WarnNamespace, fmt.Sprintf("namespace %q: ignoring invalid annotation %s=%q: %v", ns.Name, key, value, err)})
	}
	for _, k := range limits.Keys {
		v, ok := ns.Annotations[k.Annotation()]
		if !ok {
			continue
		}
		n, err := limits.ParseValue(k, v)
		if err != nil {
			warn(k.Annotation(), v, err)
			continue
		}
		s.Set(k, n)
	}
	if v, ok := ns.Annotations[limits.MaxIOPSAnnotation]; ok {
		if n, err := limits.ParseIOPS(v); err != nil {
			warn(limits.MaxIOPSAnnotation, v, err)
		} else {
			ceil.iops = n
		}
	}
	if v, ok := ns.Annotations[limits.MaxBPSAnnotation]; ok {
		if n, err := limits.ParseBPS(v); err != nil {
			warn(limits.MaxBPSAnnotation, v, err)
		} else {
			ceil.bps = n
		}
	}
	return s, ceil
}

// parsePod reads the pod-wide overrides and the per-container ones. Every
// invalid value, unknown per-container key and unknown container is an error
// naming the annotation key and its value.
func parsePod(pod *corev1.Pod, errs *field.ErrorList, warnings *[]Warning) (Settings, map[string]*Settings) {
	var podLevel Settings
	var perContainer map[string]*Settings

	keys := make([]string, 0, 8)
	for k := range pod.Annotations {
		if strings.HasPrefix(k, limits.ContainerAnnotationPrefix) || strings.HasPrefix(k, limits.Prefix) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys) // errors in a stable order

	for _, key := range keys {
		value := pod.Annotations[key]
		if name, ok := strings.CutPrefix(key, limits.ContainerAnnotationPrefix); ok {
			if !hasContainer(pod, name) {
				*errs = append(*errs, field.Invalid(annotationsPath.Key(key), value, fmt.Sprintf("the pod has no container or init container named %q", name)))
				continue
			}
			s, problems := ParseContainerValue(value)
			for _, p := range problems {
				*errs = append(*errs, field.Invalid(annotationsPath.Key(key), value, p))
			}
			if len(problems) == 0 {
				if perContainer == nil {
					perContainer = make(map[string]*Settings)
				}
				perContainer[name] = &s
			}
			continue
		}
		k, ok := limits.ParseKey(strings.TrimPrefix(key, limits.Prefix))
		if !ok {
			if key != limits.ResolvedAnnotation {
				*warnings = append(*warnings, Warning{WarnPod, fmt.Sprintf("pod annotation %s is not a per-pod KubeDiskGuard setting and is ignored", key)})
			}
			continue
		}
		n, err := limits.ParseValue(k, value)
		if err != nil {
			*errs = append(*errs, field.Invalid(annotationsPath.Key(key), value, err.Error()))
			continue
		}
		podLevel.Set(k, n)
	}
	return podLevel, perContainer
}

func hasContainer(pod *corev1.Pod, name string) bool {
	for _, list := range [2][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for i := range list {
			if list[i].Name == name {
				return true
			}
		}
	}
	return false
}
