package xds_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/service"
)

// The service with [xds] enabled serves the [[neurons]] clusters on its
// ext_proc port, and a connected Envoy does not hold up shutdown.
func TestServiceServesClustersOnExtProcPort(t *testing.T) {
	res, err := config.Load("")
	if err != nil {
		t.Fatal(err)
	}
	cfg := res.Config
	cfg.ExtProc.Listen = "127.0.0.1:0"
	cfg.Admin.Listen = "127.0.0.1:0"
	cfg.ExtProc.DrainTimeout = time.Hour // a drain waiting on the ADS stream would hang
	cfg.ExtProc.ShutdownDelay = 0        // no Envoy health-checks it
	cfg.XDS.Enabled = true
	cfg.Neurons = []config.Neuron{
		{Name: "beast", Endpoint: "http://127.0.0.1:1"},
		{Name: "rig2", Endpoint: "http://localhost:2", Cluster: "gpu-rig2"},
	}
	svc, err := service.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- svc.Run(ctx) }()

	conn, err := grpc.NewClient(svc.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sctx, scancel := context.WithTimeout(context.Background(), time.Minute) // outlives the shutdown bound below
	defer scancel()
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(sctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "anything"}, TypeUrl: resourcev3.ClusterType}); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]clusterv3.Cluster_DiscoveryType{}
	for _, a := range resp.GetResources() {
		c := &clusterv3.Cluster{}
		if err := a.UnmarshalTo(c); err != nil {
			t.Fatal(err)
		}
		got[c.GetName()] = c.GetType()
	}
	if len(got) != 2 || got["neuron-beast"] != clusterv3.Cluster_STATIC || got["gpu-rig2"] != clusterv3.Cluster_STRICT_DNS {
		t.Fatalf("clusters %v; want neuron-beast STATIC and gpu-rig2 STRICT_DNS", got)
	}

	cancel()
	select {
	case err := <-ran:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("service did not stop with an xDS stream open: drain waits for the ADS stream")
	}
	if _, err := st.Recv(); err == nil {
		t.Error("ADS stream still open after shutdown")
	}
}
