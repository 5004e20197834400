//! `hermes status [IMAGE]`: what the controller knows about running images and policies, from
//! its node API (`GET /v1/images`, `GET /v1/policies`) through the contract's client, so every
//! request has a deadline and every answer a size cap.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use hermes_controller::reconcile::LayerState;
use hermes_controller::starts::StartStats;
use hermes_controller::status::{ImageReport, PolicyReport};
use hermes_node_api::client::{Client, ClientOptions, Error as ApiError};
use hermes_oci::Reference;

use crate::controller_cmd::DEFAULT_LISTEN;
use crate::size::human;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One image: a reference as containers name it, or a manifest digest [default: all images
    /// and policies].
    image: Option<String>,
    /// The controller's node API.
    #[arg(long, value_name = "URL", env = "HERMES_CONTROLLER", default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    controller: String,
    /// File holding the controller's bearer token.
    #[arg(long, value_name = "FILE", env = "HERMES_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Trust this PEM CA certificate for an https:// controller (besides the system's roots).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Print JSON: the image's report, or `{"images": […], "policies": […]}`.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let token = args
        .token_file
        .as_deref()
        .map(hermes_snapshotter::config::read_token_file)
        .transpose()?;
    let ca_pem = args
        .tls_ca
        .as_deref()
        .map(|path| {
            std::fs::read(path)
                .with_context(|| format!("cannot read the CA certificate {}", path.display()))
        })
        .transpose()?;
    let client = Client::new(
        &args.controller,
        ClientOptions {
            token,
            ca_pem,
            ..ClientOptions::default()
        },
    )
    .with_context(|| match &args.tls_ca {
        Some(path) => format!("is {} a PEM certificate?", path.display()),
        None => "cannot set up an HTTP client".to_owned(),
    })?;
    let base = client.base().to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (images, policies): (Vec<ImageReport>, Vec<PolicyReport>) = runtime.block_on(async {
        let images = client.images().await.map_err(|e| explain(e, &base))?;
        let policies = client.policies().await.map_err(|e| explain(e, &base))?;
        anyhow::Ok((images, policies))
    })?;
    let mut out = std::io::stdout().lock();
    match &args.image {
        Some(wanted) => {
            let Some(report) = images.iter().find(|r| is_image(r, wanted)) else {
                bail!(
                    "the controller at {base} has no status for {wanted}: no running container uses it, or no policy matches it"
                );
            };
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(report)?)?;
            } else {
                print_image(&mut out, report)?;
            }
        }
        None if args.json => {
            let all = serde_json::json!({ "images": images, "policies": policies });
            writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
        }
        None => {
            print_images(&mut out, &images)?;
            writeln!(out)?;
            print_policies(&mut out, &policies)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A node-API error with what to do about it.
fn explain(error: ApiError, base: &str) -> anyhow::Error {
    let hint = match &error {
        ApiError::Request { .. } => format!(
            "cannot reach the controller at {base}: is `hermes controller` running there? (--controller URL or HERMES_CONTROLLER)"
        ),
        ApiError::Unauthorized { .. } => {
            format!("the controller at {base} wants a bearer token: pass --token-file FILE")
        }
        _ => format!("the controller at {base} answered something unusable"),
    };
    anyhow::Error::new(error).context(hint)
}

fn is_image(report: &ImageReport, wanted: &str) -> bool {
    let status = &report.status;
    if status.digest.as_str() == wanted || status.reference == wanted {
        return true;
    }
    Reference::parse(wanted).is_ok_and(|w| {
        w.to_string() == status.reference || w.digest.as_ref() == Some(&status.digest)
    })
}

/// (indexed, skipped) layer counts.
fn layer_counts(report: &ImageReport) -> (usize, usize) {
    let layers = &report.status.layers;
    let indexed = layers
        .iter()
        .filter(|l| l.state == LayerState::Indexed)
        .count();
    let skipped = layers
        .iter()
        .filter(|l| matches!(l.state, LayerState::Skipped { .. }))
        .count();
    (indexed, skipped)
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

fn print_images(out: &mut impl Write, images: &[ImageReport]) -> std::io::Result<()> {
    if images.is_empty() {
        return writeln!(out, "no images: no running container matches a policy");
    }
    let width = images
        .iter()
        .map(|r| r.status.reference.len())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(
        out,
        "{:<width$}  {:<8}  {:>4}  {:>7}  {:>7}  {:>7}  {:>9}  {:>9}  LAST ERROR",
        "IMAGE", "PHASE", "PODS", "LAYERS", "INDEXED", "SKIPPED", "BUILD", "READ"
    )?;
    for r in images {
        let (indexed, skipped) = layer_counts(r);
        writeln!(
            out,
            "{:<width$}  {:<8}  {:>4}  {:>7}  {:>7}  {:>7}  {:>8.1}s  {:>9}  {}",
            r.status.reference,
            format!("{:?}", r.status.phase),
            r.status.pods,
            r.status.layers.len(),
            indexed,
            skipped,
            r.build_seconds,
            human(r.bytes_read),
            r.last_error.as_deref().map_or("-".to_owned(), one_line)
        )?;
    }
    Ok(())
}

fn print_image(out: &mut impl Write, r: &ImageReport) -> std::io::Result<()> {
    let s = &r.status;
    let (indexed, skipped) = layer_counts(r);
    writeln!(out, "image:      {}", s.reference)?;
    writeln!(out, "manifest:   {}", s.digest)?;
    writeln!(out, "policy:     {}", s.policy)?;
    writeln!(out, "phase:      {:?}", s.phase)?;
    if let Some(reason) = &s.reason {
        writeln!(out, "reason:     {}", one_line(reason))?;
    }
    writeln!(out, "pods:       {}", s.pods)?;
    writeln!(
        out,
        "layers:     {} ({indexed} indexed, {skipped} skipped)",
        s.layers.len()
    )?;
    writeln!(
        out,
        "built in:   {:.1}s, {} read from the registry",
        r.build_seconds,
        human(r.bytes_read)
    )?;
    if let Some(e) = &r.last_error {
        writeln!(out, "last error: {}", one_line(e))?;
    }
    print_starts(out, &r.starts)?;
    for l in &s.layers {
        let state = match &l.state {
            LayerState::Indexed => "indexed".to_owned(),
            LayerState::Skipped { reason } => format!("skipped: {reason}"),
            LayerState::Pending => "pending".to_owned(),
            LayerState::Queued => "queued".to_owned(),
            LayerState::Building { attempt } => format!("building (attempt {attempt})"),
            LayerState::Retrying {
                failures,
                last_error,
            } => format!(
                "retrying after {failures} failures: {}",
                one_line(last_error)
            ),
            LayerState::Failed { reason } => format!("failed: {}", one_line(reason)),
        };
        writeln!(out, "  {} {:>10}  {state}", l.digest, human(l.size))?;
    }
    Ok(())
}

/// The image's pod starts: counters, then the last pods, newest first.
fn print_starts(out: &mut impl Write, starts: &StartStats) -> std::io::Result<()> {
    writeln!(
        out,
        "starts:     {} lazy, {} fallbacks",
        starts.lazy_starts, starts.fallbacks
    )?;
    for p in &starts.last_pods {
        let pod = if p.name.is_empty() {
            "(pod unknown)".to_owned()
        } else {
            format!("{}/{}", p.namespace, p.name)
        };
        let local = p
            .fully_local_seconds
            .map_or(String::new(), |s| format!(", fully local after {s:.1}s"));
        let reason = p
            .reason
            .as_deref()
            .map_or(String::new(), |r| format!(": {}", one_line(r)));
        writeln!(
            out,
            "  {pod} on {}: {:?}, {} fetched{local}{reason}",
            if p.node.is_empty() { "?" } else { &p.node },
            p.mode,
            human(p.bytes_fetched),
        )?;
    }
    Ok(())
}

fn print_policies(out: &mut impl Write, policies: &[PolicyReport]) -> std::io::Result<()> {
    if policies.is_empty() {
        return writeln!(out, "no policies");
    }
    let width = policies
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    writeln!(
        out,
        "{:<width$}  {:<5}  {:>7}  {:>5}  MESSAGE",
        "POLICY", "VALID", "MATCHED", "READY"
    )?;
    for p in policies {
        let condition = |kind: &str| p.status.conditions.iter().find(|c| c.kind == kind);
        let valid = condition("Valid").map_or("?", |c| c.status.as_str());
        let message = match condition("Valid") {
            Some(c) if c.status != "True" => c.message.clone(),
            _ => condition("Ready").map_or(String::new(), |c| c.message.clone()),
        };
        writeln!(
            out,
            "{:<width$}  {:<5}  {:>7}  {:>5}  {}",
            p.name,
            valid,
            p.status.matched_images,
            p.status.ready_images,
            one_line(&message)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hermes_controller::starts::{PodStart, StartMode};

    #[test]
    fn an_image_shows_its_start_counters_and_last_pods() {
        let mut starts = StartStats::default();
        for (name, mode, reason) in [
            (
                "old",
                StartMode::Fallback,
                Some("1 of 1 layers pulled normally: no zTOC (1)"),
            ),
            ("new", StartMode::Lazy, None),
        ] {
            starts.record(PodStart {
                namespace: "default".into(),
                name: name.into(),
                node: "node-1".into(),
                mode,
                bytes_fetched: 2048,
                fully_local_seconds: None,
                reason: reason.map(str::to_owned),
                at_unix: 1,
            });
        }
        let mut out = Vec::new();
        print_starts(&mut out, &starts).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "starts:     1 lazy, 1 fallbacks", "{text}");
        assert!(
            lines[1].starts_with("  default/new on node-1: Lazy, "),
            "{text}"
        );
        assert!(
            lines[2].starts_with("  default/old on node-1: Fallback, ")
                && lines[2].ends_with(": 1 of 1 layers pulled normally: no zTOC (1)"),
            "{text}"
        );
    }
}
