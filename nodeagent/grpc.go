package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	v1alpha1 "github.com/layercache/layercache/api/v1alpha1"
)

// Sockets returns where the CSI endpoint and the registration socket live
// under the kubelet's root directory.
func Sockets(kubeletDir string) (csiSocket, registrationSocket string) {
	return filepath.Join(kubeletDir, "plugins", v1alpha1.DriverName, "csi.sock"),
		filepath.Join(kubeletDir, "plugins_registry", v1alpha1.DriverName+"-reg.sock")
}

// Server serves a gRPC service on a unix socket for the manager's
// lifetime (a manager.Runnable, on every replica: no leader election).
type Server struct {
	Socket   string
	Register func(*grpc.Server)
}

// NeedLeaderElection implements manager.LeaderElectionRunnable.
func (s *Server) NeedLeaderElection() bool { return false }

// Start implements manager.Runnable.
func (s *Server) Start(ctx context.Context) error {
	log := logf.FromContext(ctx).WithValues("socket", s.Socket)
	if err := os.MkdirAll(filepath.Dir(s.Socket), 0o750); err != nil {
		return err
	}
	// A socket left by a previous run (killed) blocks the listen.
	if err := os.Remove(s.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	l, err := net.Listen("unix", s.Socket)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", s.Socket, err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(logErrors))
	s.Register(srv)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	log.Info("Serving gRPC")
	select {
	case <-ctx.Done():
		srv.GracefulStop()
		os.Remove(s.Socket)
		return nil
	case err := <-done:
		os.Remove(s.Socket)
		return err
	}
}

func logErrors(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	if err != nil {
		logf.Log.WithName("csi").Error(err, "Call failed", "method", info.FullMethod)
	}
	return resp, err
}

// CSIServer serves the driver's Identity and Node services.
func CSIServer(d *Driver, socket string) *Server {
	return &Server{Socket: socket, Register: func(s *grpc.Server) {
		csi.RegisterIdentityServer(s, d)
		csi.RegisterNodeServer(s, d)
	}}
}

// registrar answers the kubelet's plugin watcher: it tells the kubelet
// where the CSI endpoint is, so no node-driver-registrar sidecar is needed.
type registrar struct {
	registerapi.UnimplementedRegistrationServer
	endpoint string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type: registerapi.CSIPlugin, Name: v1alpha1.DriverName,
		Endpoint: r.endpoint, SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(ctx context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	log := logf.Log.WithName("registration")
	if st.PluginRegistered {
		log.Info("Registered with the kubelet")
	} else {
		log.Error(errors.New(st.Error), "The kubelet refused the registration")
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// RegistrationServer serves the kubelet plugin registration socket.
func RegistrationServer(csiSocket, socket string) *Server {
	return &Server{Socket: socket, Register: func(s *grpc.Server) {
		registerapi.RegisterRegistrationServer(s, &registrar{endpoint: csiSocket})
	}}
}
