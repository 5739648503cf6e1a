// Package deploy holds deployment material: the container image
// (Dockerfile), Kubernetes manifests and a systemd unit. Its tests check
// that these files, docker-compose.yaml and compose/ agree with each other:
// every neuron has a compose service and an Envoy cluster, ports line up,
// referenced files exist, and the embedded Envoy configs validate.
package deploy
