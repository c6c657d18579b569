// Command kubediskguard-webhook is the mutating admission webhook that stamps
// each pod of an opted-in namespace with its resolved disk IO limits.
package main

import (
	"github.com/kubediskguard/kubediskguard/shared/command"
	"github.com/kubediskguard/kubediskguard/webhook/app"
)

func main() { command.Main("kubediskguard-webhook", app.ParseOptions) }
