//! The agent's NBD front: request headers, option headers and NBD_OPT_INFO payloads from an
//! untrusted client. Parsing never panics, and a parsed request encodes back to its bytes.
#![no_main]

use agent::nbd::proto::{REQUEST_LEN, Request, parse_info_request, parse_option_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = <&[u8; REQUEST_LEN]>::try_from(&data[..data.len().min(REQUEST_LEN)]) {
        if let Ok(r) = Request::parse(head) {
            assert_eq!(&r.encode(), head);
            let _ = r.check(1 << 30);
        }
    }
    if let Ok(head) = <&[u8; 16]>::try_from(&data[..data.len().min(16)]) {
        let _ = parse_option_header(head);
    }
    let _ = parse_info_request(data);
});
