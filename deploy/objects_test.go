package deploy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8slabels "k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// apiTypes are the Kubernetes (and Prometheus Operator) types our
// manifests and chart may contain, by apiVersion and kind. Every object is
// decoded strictly into its type: a misspelled or misplaced field, or one
// the API does not have, fails the test instead of being dropped by the API
// server (or, worse, silently ignored by kubectl apply).
var apiTypes = map[string]func() metav1.Object{
	"v1/Namespace":                            func() metav1.Object { return new(corev1.Namespace) },
	"v1/ConfigMap":                            func() metav1.Object { return new(corev1.ConfigMap) },
	"v1/Service":                              func() metav1.Object { return new(corev1.Service) },
	"apps/v1/Deployment":                      func() metav1.Object { return new(appsv1.Deployment) },
	"policy/v1/PodDisruptionBudget":           func() metav1.Object { return new(policyv1.PodDisruptionBudget) },
	"networking.k8s.io/v1/NetworkPolicy":      func() metav1.Object { return new(networkingv1.NetworkPolicy) },
	"monitoring.coreos.com/v1/ServiceMonitor": func() metav1.Object { return new(monitoringv1.ServiceMonitor) },
}

// k8sObjects are decoded objects keyed "source:Kind/name".
type k8sObjects map[string]metav1.Object

// decodeObjects decodes every document of a multi-document YAML stream.
func decodeObjects(source string, data []byte) (k8sObjects, error) {
	out := k8sObjects{}
	r := k8syaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 1; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %v", source, i, err)
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			return nil, fmt.Errorf("%s: document %d: %v", source, i, err)
		}
		if tm.Kind == "" && tm.APIVersion == "" {
			continue // comments only
		}
		newObj, ok := apiTypes[tm.APIVersion+"/"+tm.Kind]
		if !ok {
			return nil, fmt.Errorf("%s: document %d is %s %s, which deploy/objects_test.go does not know: add its Go type to apiTypes", source, i, tm.APIVersion, tm.Kind)
		}
		obj := newObj()
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			return nil, fmt.Errorf("%s: %s %q: %v", source, tm.Kind, objectName(doc), err)
		}
		key := source + ":" + tm.Kind + "/" + obj.GetName()
		if _, dup := out[key]; dup {
			return nil, fmt.Errorf("%s: two %s objects named %q", source, tm.Kind, obj.GetName())
		}
		out[key] = obj
	}
}

func objectName(doc []byte) string {
	var m struct {
		Metadata struct{ Name string } `json:"metadata"`
	}
	_ = yaml.Unmarshal(doc, &m)
	return m.Metadata.Name
}

// manifests decodes every object of deploy/kubernetes/*.yaml, keyed
// "file:Kind/name".
func manifests(t *testing.T) k8sObjects {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in deploy/kubernetes (%v)", err)
	}
	out := k8sObjects{}
	for _, f := range files {
		objs, err := decodeObjects(filepath.Base(f), readFile(t, f))
		if err != nil {
			t.Fatal(err)
		}
		for k, o := range objs {
			if _, ns := o.(*corev1.Namespace); !ns && o.GetNamespace() != "cortex" {
				t.Errorf("%s is in namespace %q, want cortex", k, o.GetNamespace())
			}
			out[k] = o
		}
	}
	return out
}

// object returns the object at key as a *T.
func object[T any](t *testing.T, objs k8sObjects, key string) *T {
	t.Helper()
	o, ok := objs[key]
	if !ok {
		t.Fatalf("object %s missing (have %s)", key, strings.Join(objs.keys(), ", "))
	}
	v, ok := any(o).(*T)
	if !ok {
		t.Fatalf("object %s is a %T", key, o)
	}
	return v
}

func (o k8sObjects) keys() []string {
	ks := make([]string, 0, len(o))
	for k := range o {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// ofType lists the objects of type *T, by key.
func ofType[T any](objs k8sObjects) map[string]*T {
	out := map[string]*T{}
	for k, o := range objs {
		if v, ok := any(o).(*T); ok {
			out[k] = v
		}
	}
	return out
}

func container(t *testing.T, spec *corev1.PodSpec, owner, name string) *corev1.Container {
	t.Helper()
	for i := range spec.Containers {
		if spec.Containers[i].Name == name {
			return &spec.Containers[i]
		}
	}
	t.Fatalf("%s has no container %q", owner, name)
	return nil
}

// containerPort resolves a probe's or policy's port (number or name) to
// the container port number.
func containerPort(t *testing.T, c *corev1.Container, p intstr.IntOrString) int {
	t.Helper()
	if p.Type == intstr.Int {
		return p.IntValue()
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort)
		}
	}
	t.Fatalf("container %s has no port named %q", c.Name, p.StrVal)
	return 0
}

// envValue is a container's literal environment variable.
func envValue(c *corev1.Container, name string) (string, bool) {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value, e.ValueFrom == nil
		}
	}
	return "", false
}

// selects reports whether a label selector (matchLabels and
// matchExpressions) selects labels.
func selects(sel *metav1.LabelSelector, podLabels map[string]string) bool {
	if sel == nil || (len(sel.MatchLabels) == 0 && len(sel.MatchExpressions) == 0) {
		return false
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return false
	}
	return s.Matches(k8slabels.Set(podLabels))
}
