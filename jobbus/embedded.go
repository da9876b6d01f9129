package jobbus

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
)

// Embedded is a NATS server inside the gateway's process: JetStream on,
// listening on loopback only, with a generated credential.
type Embedded struct {
	srv *natsserver.Server
	// Options reach it: its URL and credential.
	Options ConnectOptions
}

// CredentialFile is where, under the data folder, the embedded server's
// generated credential is kept (mode 0600), for local workers and tools.
const CredentialFile = "nats/credential"

// StartEmbedded starts a NATS server with JetStream storage under
// dataDir/nats, on a random loopback port.
func StartEmbedded(dataDir string) (*Embedded, error) {
	dir := filepath.Join(dataDir, "nats")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("NATS folder: %w", err)
	}
	user, pass, err := credential(filepath.Join(dataDir, CredentialFile))
	if err != nil {
		return nil, err
	}
	srv, err := natsserver.NewServer(&natsserver.Options{
		ServerName: "stepwise", Host: "127.0.0.1", Port: natsserver.RANDOM_PORT,
		JetStream: true, StoreDir: filepath.Join(dir, "jetstream"),
		Username: user, Password: pass, NoSigs: true, NoLog: true,
		MaxPayload: 64 << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("embedded NATS: %w", err)
	}
	srv.Start()
	if !srv.ReadyForConnections(30 * time.Second) {
		srv.Shutdown()
		return nil, errors.New("embedded NATS did not start within 30 s")
	}
	return &Embedded{srv: srv, Options: ConnectOptions{URL: srv.ClientURL(), User: user, Password: pass}}, nil
}

// Shutdown stops the server; what JetStream stored stays on disk.
func (e *Embedded) Shutdown() {
	e.srv.Shutdown()
	e.srv.WaitForShutdown()
}

// credential reads the generated user and password at path, making them the
// first time. A new password each start would do as well for the gateway's
// own children, but a stable one lets a tool or a local worker started by
// hand join with the file.
func credential(path string) (user, pass string, err error) {
	if raw, err := os.ReadFile(path); err == nil {
		if u, p, ok := strings.Cut(strings.TrimSpace(string(raw)), ":"); ok && u != "" && p != "" {
			return u, p, nil
		}
	}
	var b [24]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", "", err
	}
	user, pass = "stepwise", hex.EncodeToString(b[:])
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", "", fmt.Errorf("NATS credential: %w", err)
	}
	if err := os.WriteFile(path, []byte(user+":"+pass+"\n"), 0o600); err != nil {
		return "", "", fmt.Errorf("NATS credential: %w", err)
	}
	return user, pass, nil
}

// ReadCredential reads the credential an embedded server keeps under dataDir.
func ReadCredential(dataDir string) (user, pass string, err error) {
	raw, err := os.ReadFile(filepath.Join(dataDir, CredentialFile))
	if err != nil {
		return "", "", fmt.Errorf("NATS credential: %w", err)
	}
	u, p, ok := strings.Cut(strings.TrimSpace(string(raw)), ":")
	if !ok {
		return "", "", fmt.Errorf("NATS credential %s: not user:password", filepath.Join(dataDir, CredentialFile))
	}
	return u, p, nil
}
