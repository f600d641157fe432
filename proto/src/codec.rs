//! The gRPC codec of every StellarCloud service: prost encoding, with a request that does
//! not decode (a string that is not UTF-8, a truncated field) answered INVALID_ARGUMENT
//! naming the message, rather than prost's INTERNAL, which would blame the server.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::ProstEncoder;

/// Prost encoding with typed decode errors (generated services name it in `codec_path`).
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(PhantomData)
    }
}

/// Decodes `U`, refusing malformed bytes as the sender's mistake.
#[derive(Debug, Clone, Default)]
pub struct Decoder<U>(PhantomData<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| malformed::<U>(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The status for bytes that are not a valid `U`.
fn malformed<U>(e: &prost::DecodeError) -> Status {
    let full = std::any::type_name::<U>();
    let name = full.rsplit("::").next().unwrap_or(full);
    Status::invalid_argument(format!(
        "malformed {name}: {e} (strings must be UTF-8; check the client's generated code)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;

    #[test]
    fn a_non_utf8_string_is_invalid_argument_naming_the_message() {
        // DeployRequest.name (field 2, length-delimited) = 0xff 0xfe.
        let bytes = [0x12, 0x02, 0xff, 0xfe];
        let e = pb::DeployRequest::decode(&bytes[..]).unwrap_err();
        let s = malformed::<pb::DeployRequest>(&e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().starts_with("malformed DeployRequest:"),
            "{}",
            s.message()
        );
    }
}
