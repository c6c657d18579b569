package limits

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
)

// Resolved is the value of the kubediskguard.io/limits annotation: the limits
// of every limited container of a pod, keyed by container name. A container
// without an entry is not limited.
type Resolved map[string]Limits

// Encode renders the annotation value: a JSON object with its keys sorted, so
// that the same limits always give the same bytes.
func (r Resolved) Encode() string {
	names := make([]string, 0, len(r))
	for n := range r {
		names = append(names, n)
	}
	slices.Sort(names)
	b := make([]byte, 0, 16+len(r)*96)
	b = append(b, '{')
	for i, n := range names {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, n)
		l := r[n]
		b = append(b, `:{"readIOPS":`...)
		b = strconv.AppendUint(b, l.ReadIOPS, 10)
		b = append(b, `,"writeIOPS":`...)
		b = strconv.AppendUint(b, l.WriteIOPS, 10)
		b = append(b, `,"readBPS":`...)
		b = strconv.AppendUint(b, l.ReadBPS, 10)
		b = append(b, `,"writeBPS":`...)
		b = strconv.AppendUint(b, l.WriteBPS, 10)
		b = append(b, '}')
	}
	b = append(b, '}')
	return string(b)
}

// DecodeResolved parses the annotation value written by Encode.
func DecodeResolved(s string) (Resolved, error) {
	var r Resolved
	if err := json.Unmarshal([]byte(s), &r); err != nil {
		return nil, fmt.Errorf("decoding %s annotation: %w", ResolvedAnnotation, err)
	}
	if r == nil {
		return nil, fmt.Errorf("decoding %s annotation: want a JSON object, got %q", ResolvedAnnotation, s)
	}
	for name, l := range r {
		if l.ReadIOPS > MaxIOPS || l.WriteIOPS > MaxIOPS {
			return nil, fmt.Errorf("decoding %s annotation: container %q: IOPS limit above %d", ResolvedAnnotation, name, uint64(MaxIOPS))
		}
	}
	return r, nil
}

// appendJSONString appends s as a JSON string. Container names are DNS labels
// once the API server has validated the pod, but the webhook sees pods before
// validation, so anything else is escaped by encoding/json.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '.' || 'A' <= c && c <= 'Z' || c == '_') {
			q, _ := json.Marshal(s) // a string always marshals
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
