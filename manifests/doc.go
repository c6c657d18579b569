// Package manifests holds no code: it is the kustomize base that installs
// KubeDiskGuard (kubectl apply -k manifests/), and its test renders the base
// with the pinned kubectl, decodes every object into its typed Go object and
// checks the invariants whose breakage only shows in a running cluster.
package manifests
