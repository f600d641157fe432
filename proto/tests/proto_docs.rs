//! The protos stand alone: every service, method, message, field, enum and enum value in
//! `proto/stellar/v1/*.proto` carries a comment (leading or trailing), so a client author
//! reading only the proto files learns what each one means. Read from the descriptors protoc
//! produced for the build (its source info keeps the comments).

use prost::Message;
use prost_types::source_code_info::Location;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

// Field numbers of descriptor.proto, the paths of protoc's source info.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUM: i32 = 4;
const MESSAGE_ONEOF: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

/// Every documentable element of a file: its source-info path and its name.
fn elements(file: &prost_types::FileDescriptorProto) -> Vec<(Vec<i32>, String)> {
    fn enum_elements(e: &EnumDescriptorProto, path: Vec<i32>, out: &mut Vec<(Vec<i32>, String)>) {
        let name = e.name().to_string();
        for (i, v) in e.value.iter().enumerate() {
            let mut p = path.clone();
            p.extend([ENUM_VALUE, i as i32]);
            out.push((p, format!("{name}.{}", v.name())));
        }
        out.push((path, name));
    }
    fn message_elements(
        m: &DescriptorProto,
        path: Vec<i32>,
        prefix: &str,
        out: &mut Vec<(Vec<i32>, String)>,
    ) {
        let name = format!("{prefix}{}", m.name());
        // Map fields' synthetic entry messages have no source of their own.
        if m.options.as_ref().is_some_and(|o| o.map_entry()) {
            return;
        }
        for (i, f) in m.field.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_FIELD, i as i32]);
            out.push((p, format!("{name}.{}", f.name())));
        }
        for (i, o) in m.oneof_decl.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_ONEOF, i as i32]);
            out.push((p, format!("{name}.{} (oneof)", o.name())));
        }
        for (i, n) in m.nested_type.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_NESTED, i as i32]);
            message_elements(n, p, &format!("{name}."), out);
        }
        for (i, e) in m.enum_type.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_ENUM, i as i32]);
            enum_elements(e, p, out);
        }
        out.push((path, name));
    }
    let mut out = Vec::new();
    for (i, m) in file.message_type.iter().enumerate() {
        message_elements(m, vec![FILE_MESSAGE, i as i32], "", &mut out);
    }
    for (i, e) in file.enum_type.iter().enumerate() {
        enum_elements(e, vec![FILE_ENUM, i as i32], &mut out);
    }
    for (i, s) in file.service.iter().enumerate() {
        for (j, m) in s.method.iter().enumerate() {
            out.push((
                vec![FILE_SERVICE, i as i32, SERVICE_METHOD, j as i32],
                format!("{}.{}", s.name(), m.name()),
            ));
        }
        out.push((vec![FILE_SERVICE, i as i32], s.name().to_string()));
    }
    out
}

fn documented(l: &Location) -> bool {
    let text = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.trim().is_empty());
    text(&l.leading_comments) || text(&l.trailing_comments)
}

#[test]
fn every_element_of_the_api_has_a_comment() {
    let set = FileDescriptorSet::decode(stellar_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let ours: Vec<_> = set
        .file
        .iter()
        .filter(|f| f.name().starts_with("stellar/"))
        .collect();
    assert_eq!(ours.len(), 7, "every proto file is in the set");
    let mut missing = Vec::new();
    let mut checked = 0;
    for f in ours {
        let info = f
            .source_code_info
            .as_ref()
            .expect("protoc kept the source info");
        for (path, name) in elements(f) {
            checked += 1;
            let loc = info.location.iter().find(|l| l.path == path);
            if !loc.is_some_and(documented) {
                missing.push(format!("{}: {name}", f.name()));
            }
        }
    }
    assert!(
        checked > 900,
        "only {checked} elements found: the walk is broken"
    );
    assert!(
        missing.is_empty(),
        "{} element(s) of the API have no comment (write one on the line above or at the \
         end of the line):\n{}",
        missing.len(),
        missing.join("\n")
    );
}
