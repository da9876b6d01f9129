package jobbus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ConnectOptions say how to reach NATS; the credential and TLS fields pass
// through to nats.go.
type ConnectOptions struct {
	URL string
	// User and Password: the embedded server's generated credential.
	User, Password string
	// CredsFile is a NATS credentials file (JWT + nkey seed).
	CredsFile string
	// NKeyFile is an nkey seed file.
	NKeyFile string
	// TLSCert and TLSKey are a client certificate; TLSCA verifies the server.
	TLSCert, TLSKey, TLSCA string
	// Name shows in the server's connection list.
	Name string
}

// Bus is a connection to NATS with the JetStream objects the protocol uses.
type Bus struct {
	NC      *nats.Conn
	JS      jetstream.JetStream
	Stream  jetstream.Stream
	Results jetstream.ObjectStore
	Cancels jetstream.KeyValue
	Meta    jetstream.KeyValue
}

// Connect opens a connection. It reconnects forever on its own: a NATS restart
// is a pause, not an end.
func Connect(o ConnectOptions) (*Bus, error) {
	opts := []nats.Option{nats.Name(o.Name), nats.MaxReconnects(-1), nats.ReconnectWait(250 * time.Millisecond)}
	if o.User != "" {
		opts = append(opts, nats.UserInfo(o.User, o.Password))
	}
	if o.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(o.CredsFile))
	}
	if o.NKeyFile != "" {
		opt, err := nats.NkeyOptionFromSeed(o.NKeyFile)
		if err != nil {
			return nil, fmt.Errorf("nats nkey %s: %w", o.NKeyFile, err)
		}
		opts = append(opts, opt)
	}
	if o.TLSCert != "" || o.TLSKey != "" {
		opts = append(opts, nats.ClientCert(o.TLSCert, o.TLSKey))
	}
	if o.TLSCA != "" {
		opts = append(opts, nats.RootCAs(o.TLSCA))
	}
	nc, err := nats.Connect(o.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w", o.URL, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("JetStream: %w", err)
	}
	return &Bus{NC: nc, JS: js}, nil
}

// Close drains nothing: events are fire-and-forget, and jobs live in the stream.
func (b *Bus) Close() { b.NC.Close() }

// SetupOptions are the gateway's settings of the JetStream objects.
type SetupOptions struct {
	// AckWait is how long a job may go without its worker's word before it is
	// redelivered (a dead worker's job comes back after this).
	AckWait time.Duration
	// Retention is the results' and cancels' TTL.
	Retention time.Duration
	// MaxJobs bounds the stream (the queue's capacity across gateways).
	MaxJobs int64
	// Memory keeps everything in memory rather than in files (tests).
	Memory bool
}

// DefaultAckWait is SetupOptions.AckWait's default.
const DefaultAckWait = 15 * time.Second

// Setup creates or updates the stream, consumer and buckets and publishes the
// gateway's Meta. Only gateways call it; workers Join what it made.
func (b *Bus) Setup(ctx context.Context, o SetupOptions, meta Meta) error {
	if o.AckWait <= 0 {
		o.AckWait = DefaultAckWait
	}
	storage := jetstream.FileStorage
	if o.Memory {
		storage = jetstream.MemoryStorage
	}
	var err error
	b.Stream, err = b.JS.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: Stream, Subjects: []string{JobSubject}, Retention: jetstream.WorkQueuePolicy, Storage: storage,
		MaxMsgs: o.MaxJobs, Discard: jetstream.DiscardNew, MaxMsgSize: 64 << 20,
	})
	if err != nil {
		return fmt.Errorf("jobs stream: %w", err)
	}
	if _, err = b.Stream.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
		Durable: Consumer, AckPolicy: jetstream.AckExplicitPolicy, AckWait: o.AckWait,
		// Workers decide when a job has crashed them too often (the delivery
		// count is in each message); the server never stops redelivering.
		MaxDeliver: -1, MaxAckPending: -1,
	}); err != nil {
		return fmt.Errorf("workers' consumer: %w", err)
	}
	if b.Results, err = b.JS.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket: ResultsBucket, TTL: o.Retention, Storage: storage,
	}); err != nil {
		return fmt.Errorf("results object store: %w", err)
	}
	if b.Cancels, err = b.JS.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: CancelBucket, TTL: o.Retention, Storage: storage,
	}); err != nil {
		return fmt.Errorf("cancels bucket: %w", err)
	}
	if b.Meta, err = b.JS.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: MetaBucket, Storage: storage}); err != nil {
		return fmt.Errorf("meta bucket: %w", err)
	}
	raw, _ := json.Marshal(meta)
	if _, err := b.Meta.Put(ctx, MetaKey, raw); err != nil {
		return fmt.Errorf("publish the gateway's version: %w", err)
	}
	return nil
}

// ErrNoGateway is Join's error while no gateway has set the bus up.
var ErrNoGateway = errors.New("no gateway has set up this NATS yet (start stepwise serve first)")

// Join binds a worker to what a gateway set up and checks that the gateway
// is of the worker's making; it returns the workers' consumer.
func (b *Bus) Join(ctx context.Context, worker Meta) (jetstream.Consumer, error) {
	var err error
	if b.Meta, err = b.JS.KeyValue(ctx, MetaBucket); err != nil {
		if errors.Is(err, jetstream.ErrBucketNotFound) {
			return nil, ErrNoGateway
		}
		return nil, fmt.Errorf("meta bucket: %w", err)
	}
	e, err := b.Meta.Get(ctx, MetaKey)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil, ErrNoGateway
		}
		return nil, fmt.Errorf("read the gateway's version: %w", err)
	}
	var gw Meta
	if err := json.Unmarshal(e.Value(), &gw); err != nil {
		return nil, fmt.Errorf("%w: the gateway's version entry is unreadable: %v", ErrMismatch, err)
	}
	if err := gw.Check(worker); err != nil {
		return nil, err
	}
	if b.Stream, err = b.JS.Stream(ctx, Stream); err != nil {
		return nil, fmt.Errorf("jobs stream: %w", err)
	}
	if b.Results, err = b.JS.ObjectStore(ctx, ResultsBucket); err != nil {
		return nil, fmt.Errorf("results object store: %w", err)
	}
	if b.Cancels, err = b.JS.KeyValue(ctx, CancelBucket); err != nil {
		return nil, fmt.Errorf("cancels bucket: %w", err)
	}
	cons, err := b.Stream.Consumer(ctx, Consumer)
	if err != nil {
		return nil, fmt.Errorf("workers' consumer: %w", err)
	}
	return cons, nil
}
