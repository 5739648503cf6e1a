// Package grafana ships the Grafana dashboard for cortex-extproc
// (cortex-extproc.json: import it in Grafana and pick the Prometheus data
// source). Its test checks that every query names a metric the service
// really exports, so a renamed metric cannot silently empty a panel.
package grafana
