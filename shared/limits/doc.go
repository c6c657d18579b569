// Package limits is the contract between KubeDiskGuard's admission webhook and
// its node applier: the annotation and label keys, the four-dimension limit
// value, the parsing of user-written values, and the codec of the resolved
// kubediskguard.io/limits annotation.
package limits
