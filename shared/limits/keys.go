package limits

import "fmt"

// Annotation and label keys of the user-facing contract.
const (
	// Prefix is the prefix of every KubeDiskGuard key on namespaces and pods.
	Prefix = "kubediskguard.io/"

	// EnabledLabel opts a namespace in when its value is "true".
	EnabledLabel = Prefix + "enabled"

	// ResolvedAnnotation holds the resolved limits of every limited container,
	// written by the webhook and read by the applier.
	ResolvedAnnotation = Prefix + "limits"

	// ContainerAnnotationPrefix followed by a container name holds that
	// container's overrides: "read-iops=800,write-iops=200,read-bps=50Mi".
	ContainerAnnotationPrefix = "container.kubediskguard.io/"

	// MaxIOPSAnnotation and MaxBPSAnnotation are namespace ceilings.
	MaxIOPSAnnotation = Prefix + "max-iops"
	MaxBPSAnnotation  = Prefix + "max-bps"
)

// Dimension is one of the four limited quantities.
type Dimension uint8

const (
	ReadIOPS Dimension = iota
	WriteIOPS
	ReadBPS
	WriteBPS
	numDimensions
)

// Dimensions lists every dimension in a fixed order.
var Dimensions = [numDimensions]Dimension{ReadIOPS, WriteIOPS, ReadBPS, WriteBPS}

var dimensionNames = [numDimensions]string{"read-iops", "write-iops", "read-bps", "write-bps"}

// String is the dimension's key name, as in an annotation: "read-iops".
func (d Dimension) String() string {
	if d < numDimensions {
		return dimensionNames[d]
	}
	return fmt.Sprintf("Dimension(%d)", uint8(d))
}

// IsIOPS reports whether the dimension counts operations (not bytes).
func (d Dimension) IsIOPS() bool { return d == ReadIOPS || d == WriteIOPS }

// Key is a settable key name without its prefix: a specific key sets one
// dimension, a combined key ("iops", "bps") sets the read and write pair.
type Key uint8

const (
	KeyIOPS Key = iota
	KeyReadIOPS
	KeyWriteIOPS
	KeyBPS
	KeyReadBPS
	KeyWriteBPS
	NumKeys
)

// Keys lists every key in a fixed order.
var Keys = [NumKeys]Key{KeyIOPS, KeyReadIOPS, KeyWriteIOPS, KeyBPS, KeyReadBPS, KeyWriteBPS}

var keyNames = [NumKeys]string{"iops", "read-iops", "write-iops", "bps", "read-bps", "write-bps"}

// String is the key's name without prefix: "read-iops".
func (k Key) String() string {
	if k < NumKeys {
		return keyNames[k]
	}
	return fmt.Sprintf("Key(%d)", uint8(k))
}

// Annotation is the key's full annotation name: "kubediskguard.io/read-iops".
func (k Key) Annotation() string { return annotationNames[k] }

var annotationNames = func() (a [NumKeys]string) {
	for i, n := range keyNames {
		a[i] = Prefix + n
	}
	return a
}()

// IsIOPS reports whether the key's values are operation counts (not bytes).
func (k Key) IsIOPS() bool { return k <= KeyWriteIOPS }

// ParseKey returns the key with the given name (without prefix).
func ParseKey(name string) (Key, bool) {
	for i, n := range keyNames {
		if n == name {
			return Key(i), true
		}
	}
	return 0, false
}

// SpecificKey is the key that sets only d; CombinedKey the key that sets d
// together with its read/write counterpart.
func SpecificKey(d Dimension) Key {
	return [numDimensions]Key{KeyReadIOPS, KeyWriteIOPS, KeyReadBPS, KeyWriteBPS}[d]
}

// CombinedKey is the key that sets d together with its read/write counterpart.
func CombinedKey(d Dimension) Key {
	if d.IsIOPS() {
		return KeyIOPS
	}
	return KeyBPS
}
