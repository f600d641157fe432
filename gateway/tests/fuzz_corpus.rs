//! Replays every committed input of the gateway's HTTP fuzz target (`fuzz/corpus/…`)
//! through the same code the fuzzer runs (a real gateway in front of a real replica), so an
//! input that once crashed stays fixed without building the fuzzer. `STELLAR_FUZZ_SEEDS=write`
//! first (re)writes the hand-made seeds.

use stellar_gateway::fuzzing;
use stellar_proto::fuzzing::{replay_corpus, write_seeds};

#[test]
fn http_request_corpus() {
    let requests: [&[u8]; 5] = [
        b"POST /v1/functions/hello/invoke?tenant=acme&near=cn-east/sh HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nAda",
        b"GET /v1/health HTTP/1.1\r\nhost: a\r\n\r\n",
        b"DELETE /v1/functions/x/invoke HTTP/1.1\r\nhost: a\r\n\r\n",
        b"POST /v1/functions/%ff/invoke HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
        b"POST /v1/functions/hello/invoke?near=%zz HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ];
    write_seeds(
        "http_request",
        requests.iter().map(|r| r.to_vec()).collect(),
    );
    assert!(replay_corpus("http_request", fuzzing::http_request) > 0);
}
