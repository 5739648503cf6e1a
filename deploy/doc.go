// Package deploy holds deployment material: the container image
// (Dockerfile, build-image.sh), Kubernetes manifests, a Helm chart and a
// systemd unit. Its tests check that these files, docker-compose.yaml and
// compose/ (the demo's configs) agree with each other: every neuron has a compose service and an
// Envoy cluster, ports line up, referenced files exist, the embedded Envoy
// configs validate, every Kubernetes object (manifests and rendered chart)
// decodes strictly into its API type, the chart renders the manifests'
// objects, probes keep working with mTLS, policies admit only Envoy and the
// scraper, supervisors wait for the whole shutdown, and the pinned image is
// the one build-image.sh tags on the release.
package deploy
