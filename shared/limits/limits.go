package limits

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
)

// Unlimited is the value of a dimension that has no limit.
const Unlimited uint64 = 0

// MaxIOPS is the largest IOPS limit the kernel's block throttle can hold
// (its per-cgroup IOPS limits are 32-bit).
const MaxIOPS = math.MaxUint32

// Limits is a complete limit set for one container: 0 means unlimited.
type Limits struct {
	ReadIOPS  uint64 `json:"readIOPS"`
	WriteIOPS uint64 `json:"writeIOPS"`
	ReadBPS   uint64 `json:"readBPS"`
	WriteBPS  uint64 `json:"writeBPS"`
}

// Get returns the value of one dimension.
func (l Limits) Get(d Dimension) uint64 {
	switch d {
	case ReadIOPS:
		return l.ReadIOPS
	case WriteIOPS:
		return l.WriteIOPS
	case ReadBPS:
		return l.ReadBPS
	case WriteBPS:
		return l.WriteBPS
	}
	panic(fmt.Sprintf("limits: unknown dimension %d", d))
}

// Set sets the value of one dimension.
func (l *Limits) Set(d Dimension, v uint64) {
	switch d {
	case ReadIOPS:
		l.ReadIOPS = v
	case WriteIOPS:
		l.WriteIOPS = v
	case ReadBPS:
		l.ReadBPS = v
	case WriteBPS:
		l.WriteBPS = v
	default:
		panic(fmt.Sprintf("limits: unknown dimension %d", d))
	}
}

// IsUnlimited reports whether no dimension is limited.
func (l Limits) IsUnlimited() bool { return l == Limits{} }

// String renders the set for logs and messages: "read-iops=500 write-iops=500 read-bps=unlimited write-bps=50Mi".
func (l Limits) String() string {
	var b strings.Builder
	for i, d := range Dimensions {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(d.String())
		b.WriteByte('=')
		b.WriteString(FormatValue(d.IsIOPS(), l.Get(d)))
	}
	return b.String()
}

// FormatValue renders an IOPS or bytes/s value as a user would write it: "unlimited", "500", "50Mi".
func FormatValue(isIOPS bool, v uint64) string {
	switch {
	case v == Unlimited:
		return "unlimited"
	case isIOPS || v > math.MaxInt64:
		return strconv.FormatUint(v, 10)
	default:
		return resource.NewQuantity(int64(v), resource.BinarySI).String()
	}
}

var maxBPS = *resource.NewQuantity(math.MaxInt64, resource.DecimalSI)

var (
	errIOPS = errors.New(`must be a non-negative integer number of IO operations per second, or "unlimited"`)
	errBPS  = errors.New(`must be a non-negative whole number of bytes per second as a Kubernetes quantity (1048576, 100Mi, 1G), or "unlimited"`)
)

// ParseIOPS parses an IOPS value: a non-negative integer; "0" and "unlimited"
// mean no limit.
func ParseIOPS(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	if strings.EqualFold(s, "unlimited") {
		return Unlimited, nil
	}
	if s == "" || s[0] == '+' {
		return 0, errIOPS
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, errIOPS
	}
	if v > MaxIOPS {
		return 0, fmt.Errorf("must be at most %d, the kernel's largest IOPS limit", uint64(MaxIOPS))
	}
	return v, nil
}

// ParseBPS parses a bytes-per-second value: a Kubernetes quantity that is a
// whole, non-negative number of bytes; "0" and "unlimited" mean no limit.
func ParseBPS(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	if strings.EqualFold(s, "unlimited") {
		return Unlimited, nil
	}
	if !plausibleQuantity(s) {
		return 0, errBPS
	}
	q, err := resource.ParseQuantity(s)
	if err != nil {
		return 0, errBPS
	}
	if q.Sign() < 0 || q.Cmp(maxBPS) > 0 {
		return 0, errBPS
	}
	v := q.Value() // rounds a fraction of a byte up: refuse that below
	if q.CmpInt64(v) != 0 {
		return 0, errBPS
	}
	return uint64(v), nil
}

// ParseValue parses a value of the given key's kind.
func ParseValue(k Key, s string) (uint64, error) {
	if k.IsIOPS() {
		return ParseIOPS(s)
	}
	return ParseBPS(s)
}

// plausibleQuantity rejects strings that no bytes/s value needs but that make
// resource.ParseQuantity, or arithmetic on its result, take minutes: very
// long strings and decimal exponents of more than two digits ("1e-8666666660").
func plausibleQuantity(s string) bool {
	if len(s) > 64 {
		return false
	}
	i := strings.LastIndexAny(s, "eE")
	if i < 0 || i == len(s)-1 || s[i+1] == 'i' {
		return true // no exponent: a plain number or an SI/binary suffix
	}
	exp := strings.TrimLeft(s[i+1:], "+-")
	return len(exp) <= 2
}
