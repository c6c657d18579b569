package resolve

import (
	"fmt"
	"strings"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// Settings is what one level (the webhook defaults, a namespace, a pod or one
// container) says about limits, key by key; a key it does not mention is unset.
type Settings struct {
	values [limits.NumKeys]uint64
	isSet  [limits.NumKeys]bool
}

// Set records a value for a key.
func (s *Settings) Set(k limits.Key, v uint64) {
	s.values[k] = v
	s.isSet[k] = true
}

// Get returns the value of a key and whether it is set.
func (s *Settings) Get(k limits.Key) (uint64, bool) { return s.values[k], s.isSet[k] }

// String lists the keys that are set: "iops=500 write-bps=50Mi".
func (s *Settings) String() string {
	var b strings.Builder
	for _, k := range limits.Keys {
		if v, ok := s.Get(k); ok {
			if b.Len() > 0 {
				b.WriteByte(' ')
			}
			fmt.Fprintf(&b, "%s=%s", k, limits.FormatValue(k.IsIOPS(), v))
		}
	}
	return b.String()
}

// lookup returns the value this level gives a dimension: its specific key
// beats its combined key.
func (s *Settings) lookup(d limits.Dimension) (uint64, bool) {
	if k := limits.SpecificKey(d); s.isSet[k] {
		return s.values[k], true
	}
	if k := limits.CombinedKey(d); s.isSet[k] {
		return s.values[k], true
	}
	return 0, false
}

// ParseContainerValue parses a per-container annotation value such as
// "read-iops=800,write-iops=200,read-bps=50Mi". Every problem is returned, each
// naming the offending item.
func ParseContainerValue(v string) (Settings, []string) {
	var s Settings
	var problems []string
	if strings.TrimSpace(v) == "" {
		return s, []string{`is empty; want comma-separated key=value pairs such as "read-iops=800,write-bps=50Mi"`}
	}
	for item := range strings.SplitSeq(v, ",") {
		name, value, ok := strings.Cut(item, "=")
		name = strings.TrimSpace(name)
		if !ok {
			problems = append(problems, fmt.Sprintf("%q is not a key=value pair", strings.TrimSpace(item)))
			continue
		}
		k, known := limits.ParseKey(name)
		if !known {
			problems = append(problems, fmt.Sprintf("unknown key %q (want one of %s)", name, keyList))
			continue
		}
		if _, dup := s.Get(k); dup {
			problems = append(problems, fmt.Sprintf("key %q is given twice", name))
			continue
		}
		n, err := limits.ParseValue(k, value)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s=%q: %v", name, strings.TrimSpace(value), err))
			continue
		}
		s.Set(k, n)
	}
	return s, problems
}

var keyList = func() string {
	names := make([]string, len(limits.Keys))
	for i, k := range limits.Keys {
		names[i] = k.String()
	}
	return strings.Join(names, ", ")
}()
