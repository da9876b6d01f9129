package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/jobbus"
)

// Environment variables that carry the embedded NATS server's generated
// credential to the gateway's worker children (never on a command line,
// which every local user can read).
const (
	natsUserEnv     = "STEPWISE_NATS_USER"
	natsPasswordEnv = "STEPWISE_NATS_PASSWORD"
)

// natsFlags say how to reach an external NATS server; they pass through to nats.go.
type natsFlags struct {
	url, creds, nkey, tlsCert, tlsKey, tlsCA string
}

func (f *natsFlags) register(cmd *cobra.Command, urlHelp string) {
	fs := cmd.Flags()
	fs.StringVar(&f.url, "nats", os.Getenv("STEPWISE_NATS"), urlHelp+" ($STEPWISE_NATS)")
	fs.StringVar(&f.creds, "nats-creds", "", "NATS credentials file (JWT and nkey seed)")
	fs.StringVar(&f.nkey, "nats-nkey", "", "NATS nkey seed file")
	fs.StringVar(&f.tlsCert, "nats-tls-cert", "", "client certificate for NATS over TLS")
	fs.StringVar(&f.tlsKey, "nats-tls-key", "", "the client certificate's key")
	fs.StringVar(&f.tlsCA, "nats-tls-ca", "", "CA that signed the NATS server's certificate")
	_ = cmd.MarkFlagFilename("nats-creds")
	_ = cmd.MarkFlagFilename("nats-nkey")
}

// options are the connect options; a user and password come from the environment.
func (f *natsFlags) options(name string) jobbus.ConnectOptions {
	return jobbus.ConnectOptions{URL: f.url, User: os.Getenv(natsUserEnv), Password: os.Getenv(natsPasswordEnv),
		CredsFile: f.creds, NKeyFile: f.nkey, TLSCert: f.tlsCert, TLSKey: f.tlsKey, TLSCA: f.tlsCA, Name: name}
}
