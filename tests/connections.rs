//! The TCP connections agentd opens to PostgreSQL send without Nagle's algorithm (sqlx
//! 0.9.0 leaves it on; over TLS, statements larger than one record then waited 40 ms for
//! the server's delayed acknowledgement).
//!
//! The test server may be reached through a Unix socket, so the connections go through a
//! real TCP relay on 127.0.0.1, which also tells which local port each client used.

mod support;

use std::sync::{Arc, Mutex};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use support::TestDb;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// Relays every TCP connection on 127.0.0.1 to the server of `upstream`; returns the
/// relay's port and the client ports it accepted, in order.
async fn relay(upstream: PgConnectOptions) -> (u16, Arc<Mutex<Vec<u16>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let clients = Arc::new(Mutex::new(Vec::new()));
    let seen = clients.clone();
    tokio::spawn(async move {
        while let Ok((client, peer)) = listener.accept().await {
            seen.lock().unwrap().push(peer.port());
            let upstream = upstream.clone();
            tokio::spawn(async move {
                match upstream.get_socket() {
                    Some(folder) => {
                        let path = folder.join(format!(".s.PGSQL.{}", upstream.get_port()));
                        let server = UnixStream::connect(path).await.unwrap();
                        pipe(client, server).await;
                    }
                    None => {
                        let server = TcpStream::connect((upstream.get_host(), upstream.get_port()))
                            .await
                            .unwrap();
                        pipe(client, server).await;
                    }
                }
            });
        }
    });
    (port, clients)
}

async fn pipe(mut client: TcpStream, mut server: impl AsyncRead + AsyncWrite + Unpin) {
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

fn last_client(clients: &Mutex<Vec<u16>>) -> u16 {
    *clients
        .lock()
        .unwrap()
        .last()
        .expect("the relay accepted a client")
}

#[tokio::test]
async fn pool_connections_turn_nagles_algorithm_off() {
    let db = TestDb::new().await;
    let direct = db.options();
    let (port, clients) = relay(direct.clone()).await;
    let through_relay = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username(direct.get_username())
        .database(&db.name)
        .ssl_mode(sqlx::postgres::PgSslMode::Disable);

    // What sqlx does by itself: the option stays off (if a newer sqlx sets it, this
    // workaround and its module can go).
    let mut plain = PgConnection::connect_with(&through_relay).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut plain).await.unwrap();
    assert_eq!(
        agentd::store::socket::nodelay_of_local_port(last_client(&clients)),
        Some(false),
        "a connection sqlx opened on its own"
    );

    // agentd's pools: every connection gets it as it is opened.
    let pool = agentd::store::pool_options(&through_relay)
        .max_connections(1)
        .connect_with(through_relay.clone())
        .await
        .unwrap();
    let answer: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(answer, 1);
    assert_eq!(
        agentd::store::socket::nodelay_of_local_port(last_client(&clients)),
        Some(true),
        "a connection of agentd's pool"
    );
    // The first connection is not the pool's, but it goes to the same port: it got the
    // option too (setting it on every socket to the database's port is harmless).
    assert_eq!(
        agentd::store::socket::nodelay_of_local_port(clients.lock().unwrap()[0]),
        Some(true)
    );
    plain.close().await.unwrap();
    pool.close().await;
}
