//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`).

use serde_json::Value;

use super::status::ApiError;

pub fn decode(_body: &[u8]) -> Result<Value, ApiError> {
    Err(ApiError::unsupported_media_type("application/vnd.kubernetes.protobuf"))
}
