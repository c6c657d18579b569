// Command kubediskguard-applier is the node DaemonSet that writes each
// container's resolved disk IO limits into its cgroup.
package main

import (
	"github.com/kubediskguard/kubediskguard/applier/app"
	"github.com/kubediskguard/kubediskguard/shared/command"
)

func main() { command.Main("kubediskguard-applier", app.ParseOptions) }
