// Command gpuyard-health reads Kubernetes objects and prints, for each, the health two
// GitOps tools compute from it with their own code:
//
//   - kstatus: status.Compute of sigs.k8s.io/cli-utils/pkg/kstatus, the library behind
//     Flux's health checks (a Kustomization's `wait` and `healthChecks`);
//   - Argo CD: a Lua health script run in gopher-lua, the Lua 5.1 that Argo CD embeds, set
//     up as Argo CD sets up a health customization from argocd-cm (util/lua/lua.go in
//     argoproj/argo-cd): the standard libraries skipped except package, base and table,
//     the object as the global `obj`, a one-second limit, and the returned table's
//     `status` and `message` read, with any status Argo CD does not know shown as Unknown.
//     Argo CD also gives its scripts a restricted `os` library; gpuyard's use none of it,
//     so it is left out here, and a script that used it would fail.
//
// Usage: gpuyard-health -lua AIService=docs/argocd/health-aiservice.lua ... < objects.json
//
// The input is a JSON list of objects or a Kubernetes List (what `kubectl get -o json`
// prints). The output is a JSON list with one entry per object, in input order. Any
// error (a script that fails, an object kstatus cannot read) exits non-zero, naming the
// object.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// Verdict is one tool's reading of one object.
type Verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

// Health is both tools' readings of one object.
type Health struct {
	Kind      string   `json:"kind"`
	Namespace string   `json:"namespace,omitempty"`
	Name      string   `json:"name"`
	KStatus   Verdict  `json:"kstatus"`
	ArgoCD    *Verdict `json:"argocd,omitempty"`
}

// The health statuses Argo CD accepts from a script (gitops-engine's HealthStatusCode).
var argoStatuses = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true,
	"Healthy": true, "Degraded": true, "Missing": true,
}

type scriptFlags map[string]string

func (s scriptFlags) String() string { return fmt.Sprint(map[string]string(s)) }

func (s scriptFlags) Set(value string) error {
	kind, path, ok := strings.Cut(value, "=")
	if !ok || kind == "" || path == "" {
		return fmt.Errorf("want KIND=PATH, got %q", value)
	}
	text, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s[kind] = string(text)
	return nil
}

func main() {
	scripts := scriptFlags{}
	flag.Var(scripts, "lua", "KIND=PATH: the Argo CD health script for objects of KIND (repeatable)")
	flag.Parse()
	if err := run(os.Stdin, os.Stdout, scripts); err != nil {
		fmt.Fprintln(os.Stderr, "gpuyard-health:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer, scripts map[string]string) error {
	objects, err := readObjects(in)
	if err != nil {
		return err
	}
	results := make([]Health, 0, len(objects))
	for _, obj := range objects {
		name := fmt.Sprintf("%s %s/%s", obj.GetKind(), obj.GetNamespace(), obj.GetName())
		computed, err := status.Compute(obj)
		if err != nil {
			return fmt.Errorf("kstatus on %s: %w", name, err)
		}
		health := Health{
			Kind:      obj.GetKind(),
			Namespace: obj.GetNamespace(),
			Name:      obj.GetName(),
			KStatus:   Verdict{Status: computed.Status.String(), Message: computed.Message},
		}
		if script, ok := scripts[obj.GetKind()]; ok {
			verdict, err := argoHealth(obj, script)
			if err != nil {
				return fmt.Errorf("Argo CD health script on %s: %w", name, err)
			}
			health.ArgoCD = verdict
		}
		results = append(results, health)
	}
	encoder := json.NewEncoder(out)
	encoder.SetIndent("", "  ")
	return encoder.Encode(results)
}

// readObjects decodes the input as the API server's JSON is decoded for both tools:
// through unstructured, so integers are int64 and other numbers float64.
func readObjects(in io.Reader) ([]*unstructured.Unstructured, error) {
	data, err := io.ReadAll(in)
	if err != nil {
		return nil, err
	}
	var raw []json.RawMessage
	if trimmed := strings.TrimSpace(string(data)); strings.HasPrefix(trimmed, "{") {
		var list struct {
			Items []json.RawMessage `json:"items"`
		}
		if err := json.Unmarshal(data, &list); err != nil {
			return nil, err
		}
		raw = list.Items
	} else if err := json.Unmarshal(data, &raw); err != nil {
		return nil, err
	}
	objects := make([]*unstructured.Unstructured, 0, len(raw))
	for index, item := range raw {
		obj := &unstructured.Unstructured{}
		if err := obj.UnmarshalJSON(item); err != nil {
			return nil, fmt.Errorf("object %d: %w", index, err)
		}
		objects = append(objects, obj)
	}
	return objects, nil
}

func argoHealth(obj *unstructured.Unstructured, script string) (*Verdict, error) {
	state := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer state.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		err := state.CallByParam(lua.P{Fn: state.NewFunction(lib.open), NRet: 0, Protect: true},
			lua.LString(lib.name))
		if err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	state.SetContext(ctx)
	state.SetGlobal("obj", toLua(state, obj.Object))
	if err := state.DoString(script); err != nil {
		return nil, err
	}
	returned, ok := state.Get(-1).(*lua.LTable)
	if !ok {
		return nil, fmt.Errorf("the script returned %s, not a table", state.Get(-1).Type())
	}
	verdict := &Verdict{
		Status:  luaString(returned.RawGetString("status")),
		Message: luaString(returned.RawGetString("message")),
	}
	if !argoStatuses[verdict.Status] {
		// What Argo CD shows for a status it does not know.
		verdict = &Verdict{Status: "Unknown", Message: "Lua returned an invalid health status"}
	}
	return verdict, nil
}

func luaString(value lua.LValue) string {
	if value == lua.LNil {
		return ""
	}
	return value.String()
}

// toLua converts a decoded JSON value: objects to tables keyed by string, lists to
// sequences (Lua indices from 1), numbers to Lua numbers.
func toLua(state *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case []any:
		table := state.CreateTable(len(v), 0)
		for _, item := range v {
			table.Append(toLua(state, item))
		}
		return table
	case map[string]any:
		table := state.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetString(key, toLua(state, item))
		}
		return table
	}
	return lua.LNil
}
