//! ComfyUI's WebSocket, `/ws?clientId=`: `status` with the `sid` first, then (if this client's
//! job is running) `executing` with its node, then whatever the relay publishes for it.
//!
//! Negotiation, as ComfyUI's: only the first text message from the client counts; if it is
//! `{"type": "feature_flags", "data": {...}}` the service records the flags that are exactly
//! `true` (`supports_preview_metadata`; NOVA's `nova_events`, which may also be a non-empty
//! list) and answers with its own (`/features`). A client that negotiates `nova_events` gets
//! NOVA's `telemetry.*`, `lifecycle`, `output.preview` and `output.partial.*` events (and,
//! with `supports_preview_metadata`, image tiles as type-4 frames with a `nova` metadata key);
//! others get ComfyUI's messages only.

use super::comfy;
use super::hub::{Channel, Out};
use super::App;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

#[derive(Deserialize)]
pub(crate) struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

pub(crate) async fn handler(
    State(app): State<Arc<App>>,
    Query(q): Query<WsQuery>,
    slot: Option<axum::Extension<super::listen::Slot>>,
    ws: WebSocketUpgrade,
) -> Response {
    let sid = q
        .client_id
        .filter(|c| {
            !c.is_empty()
                && c.len() <= 128
                && c.chars()
                    .all(|x| x.is_ascii_alphanumeric() || x == '-' || x == '_')
        })
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    ws.max_message_size(1 << 20)
        .on_upgrade(move |socket| async move {
            // The connection's slot under the cap stays taken while the session lasts, and a
            // client that stops reading can hold only a small send buffer in the kernel.
            if let Some(axum::Extension(s)) = &slot {
                s.limit_send_buffer(SEND_BUFFER);
            }
            let _slot = slot;
            session(app, sid, socket).await
        })
}

/// Messages written to a socket before it is flushed.
const WRITE_BATCH: usize = 64;

/// The kernel send buffer of a WebSocket (Linux doubles it for bookkeeping): enough for a
/// burst of tiles to a client that reads, little for one that does not.
const SEND_BUFFER: usize = 256 << 10;

/// How long a write may wait for a client that takes no data before the session is closed:
/// a client that stops reading holds nothing of the engine's (see the hub), and after this
/// it holds no connection either; it can read what it missed from `/history`.
const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);

fn to_message(o: Out) -> Message {
    match o {
        Out::Text(t) => Message::Text(t),
        Out::Binary(b) => Message::Binary(b),
    }
}

async fn session(app: Arc<App>, sid: String, socket: WebSocket) {
    let client = app.hub.add(sid.clone(), Channel::WebSocket);
    let (mut tx, mut rx) = socket.split();
    let hello = comfy::status(app.queue_remaining(), Some(&sid));
    let mut ok = tx.send(to_message(Out::json(&hello))).await.is_ok();
    if let Some((prompt_id, node)) = app.sched.current_node_of(&sid) {
        let m = comfy::executing(&prompt_id, Some(&node));
        ok = ok && tx.send(to_message(Out::json(&m))).await.is_ok();
    }
    let mut first = true;
    while ok {
        tokio::select! {
            batch = app.hub.next_batch(&client, WRITE_BATCH) => match batch {
                // Everything waiting goes in one write: one flush (one syscall) for a burst of
                // tiles rather than one each.
                Some(batch) => {
                    let write = async {
                        for o in batch {
                            tx.feed(to_message(o)).await?;
                        }
                        tx.flush().await
                    };
                    ok = matches!(tokio::time::timeout(WRITE_STALL, write).await, Ok(Ok(())));
                }
                None => break,
            },
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    if std::mem::take(&mut first) {
                        if let Some(reply) = negotiate(&app, &client, t.as_str()) {
                            ok = tx.send(to_message(Out::json(&reply))).await.is_ok();
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    app.hub.remove(client.conn);
}

/// Applies a client's feature flags; returns the service's answer.
fn negotiate(app: &App, client: &super::hub::Client, text: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v.get("type")?.as_str()? != "feature_flags" {
        return None;
    }
    let data = v.get("data")?;
    let meta = data.get("supports_preview_metadata") == Some(&Value::Bool(true));
    let nova = match data.get("nova_events") {
        Some(Value::Bool(b)) => *b,
        Some(Value::Array(a)) => !a.is_empty(),
        _ => false,
    };
    client.set_flags(&app.hub, meta, nova);
    Some(comfy::msg("feature_flags", super::api::features(app)))
}
