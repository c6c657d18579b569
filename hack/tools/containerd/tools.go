//go:build tools

// Package tools pins the containerd 2.x commands that hack/test-bins.sh
// builds (the daemon, ctr and the runc shim), so that `go mod tidy` keeps
// every module they need in go.mod/go.sum.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
