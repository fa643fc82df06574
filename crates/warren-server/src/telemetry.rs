//! Logging and tracing set-up: `tracing` to stderr always, and span export over OTLP/gRPC only
//! when an endpoint is configured, so a missing collector never costs anything.
//!
//! `main` calls [`init`] once and [`Telemetry::shutdown`] at exit; the export shutdown is
//! bounded because a collector that accepts connections and never answers would otherwise
//! hold the broker's exit for seconds.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

pub fn init(log_filter: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(log_filter)
        .map_err(|e| anyhow::anyhow!("invalid configuration: log: {e}"))?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let Some(endpoint) = otlp_endpoint else {
        tracing_subscriber::registry().with(fmt).try_init()?;
        return Ok(Telemetry { provider: None });
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("warren")
                .build(),
        )
        .build();
    let tracer = provider.tracer("warren");
    // The exporter's own crates stay out of the exported spans: exporting them would feed back.
    let otel_filter = EnvFilter::new(
        "info,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off,h2=off,tonic=off,hyper=off,tower=off",
    );
    tracing_subscriber::registry()
        .with(fmt)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(otel_filter),
        )
        .try_init()?;
    Ok(Telemetry {
        provider: Some(provider),
    })
}

impl Telemetry {
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let done = tokio::task::spawn_blocking(move || provider.shutdown());
            let _ = tokio::time::timeout(Duration::from_millis(1500), done).await;
        }
    }
}
