package containerd

import (
	"testing"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kubediskguard/kubediskguard/applier/runtime"
)

func TestDecode(t *testing.T) {
	for name, tc := range map[string]struct {
		payload any
		want    runtime.Event
		ok      bool
	}{
		"container create is Created": {
			&eventstypes.ContainerCreate{ID: "c1"}, runtime.Event{Kind: runtime.Created, ContainerID: "c1"}, true,
		},
		"task create is Started with the PID": {
			&eventstypes.TaskCreate{ContainerID: "c1", Pid: 42}, runtime.Event{Kind: runtime.Started, ContainerID: "c1", PID: 42}, true,
		},
		"task start is Started with the PID": {
			&eventstypes.TaskStart{ContainerID: "c1", Pid: 42}, runtime.Event{Kind: runtime.Started, ContainerID: "c1", PID: 42}, true,
		},
		"exit of the init process is Exited": {
			&eventstypes.TaskExit{ContainerID: "c1", ID: "c1", Pid: 42}, runtime.Event{Kind: runtime.Exited, ContainerID: "c1"}, true,
		},
		"exit of an exec process is ignored": {
			&eventstypes.TaskExit{ContainerID: "c1", ID: "probe", Pid: 43}, runtime.Event{}, false,
		},
		"task delete is Exited": {
			&eventstypes.TaskDelete{ContainerID: "c1", Pid: 42}, runtime.Event{Kind: runtime.Exited, ContainerID: "c1"}, true,
		},
		"delete of an exec process is ignored": {
			&eventstypes.TaskDelete{ContainerID: "c1", ID: "probe"}, runtime.Event{}, false,
		},
		"container delete is Deleted": {
			&eventstypes.ContainerDelete{ID: "c1"}, runtime.Event{Kind: runtime.Deleted, ContainerID: "c1"}, true,
		},
	} {
		t.Run(name, func(t *testing.T) {
			anyv, err := typeurl.MarshalAny(tc.payload)
			if err != nil {
				t.Fatal(err)
			}
			got, ok, err := decode("/topic", anyv)
			if err != nil || ok != tc.ok || got != tc.want {
				t.Errorf("decode = %+v, %v, %v; want %+v, %v, nil", got, ok, err, tc.want, tc.ok)
			}
		})
	}

	anyv, err := typeurl.MarshalAny(&emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := decode("/topic", anyv); err == nil {
		t.Error("decode of an unexpected payload succeeded, want an error")
	}
}
