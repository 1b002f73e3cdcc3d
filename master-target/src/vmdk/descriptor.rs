//! The VMDK text descriptor: our own small parser and writer.
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! encoding="UTF-8"                       <- other header keys, kept in order
//! CID=<8 hex>
//! parentCID=ffffffff
//! createType="vmfs" | "monolithicFlat" | "monolithicSparse" | "twoGbMaxExtentFlat"
//!
//! # Extent description
//! RW <sectors> VMFS "NAME-flat.vmdk"     (vmfs: no offset)
//! RW <sectors> FLAT "NAME-flat.vmdk" 0   (monolithicFlat: offset in sectors)
//! RW <sectors> SPARSE "NAME.vmdk"        (monolithicSparse: embedded in NAME.vmdk)
//! RW <sectors> FLAT "NAME-f001.vmdk" 0   (twoGbMaxExtentFlat: one line per extent,
//! RW <sectors> FLAT "NAME-f002.vmdk" 0    in disk order; see two_gb_flat.rs)
//!
//! # The Disk Data Base
//! #DDB
//!
//! ddb.<key> = "<value>"
//! ```
//!
//! Invariants of a parsed [`Descriptor`]: the create type is one this writer supports, the
//! disk has no parent (no `parentFileNameHint`, `parentCID=ffffffff`), every extent is `RW`
//! of the matching kind (exactly one, but for twoGbMaxExtentFlat), and every extent file
//! name stays inside the datastore (relative, no `..`). Anything else is refused with a
//! precise [`DescriptorError`].
//!
//! qemu's parser is stricter than the format (VMDK-NOTES.md (a)): `createType` and
//! `parentFileNameHint` must be written `key="value"` without spaces, and `CID=` must be the
//! first occurrence of the text "CID", so [`Descriptor::render`] writes CID above parentCID
//! and refuses to put header keys containing "CID" before it.

use std::fmt::Write as _;

/// `parentCID` of a disk that has no parent.
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// Largest descriptor file we read: real ones are well under 1 KiB.
pub const MAX_DESCRIPTOR_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("not a VMDK text descriptor (binary data)")]
    Binary,
    #[error("descriptor is larger than {MAX_DESCRIPTOR_BYTES} bytes")]
    TooLarge,
    #[error("descriptor does not start with version=1")]
    MissingVersion,
    #[error("unsupported descriptor version {0}")]
    UnsupportedVersion(String),
    #[error("descriptor has no {0} line")]
    MissingKey(&'static str),
    #[error("descriptor line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error(
        "unsupported createType \"{0}\" (supported: vmfs, monolithicFlat, monolithicSparse, \
         twoGbMaxExtentFlat)"
    )]
    UnsupportedCreateType(String),
    #[error(
        "the disk is a delta (snapshot) disk: parentCID={parent_cid:08x}{hint}; remove its snapshots first"
    )]
    Delta { parent_cid: u32, hint: String },
    #[error("extent access {0} is not RW: the disk would not be writable")]
    NotReadWrite(String),
    #[error("extent type {kind} does not match createType {create_type}")]
    ExtentKind { kind: String, create_type: String },
    #[error(
        "descriptor has {0} extents; this createType has exactly one (only \
         twoGbMaxExtentFlat has several)"
    )]
    ExtentCount(usize),
    #[error("extent file \"{0}\" leaves the datastore (absolute path or '..')")]
    ExtentEscapes(String),
    #[error("FLAT extent offset {0} is not supported (only 0)")]
    ExtentOffset(u64),
    #[error("value {0:?} cannot be written into a descriptor")]
    Unwritable(String),
}

/// The layouts this writer supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateType {
    /// ESXi: `createType="vmfs"`, `RW n VMFS "NAME-flat.vmdk"`.
    Vmfs,
    /// Hosted: `createType="monolithicFlat"`, `RW n FLAT "NAME-flat.vmdk" 0`.
    MonolithicFlat,
    /// Hosted sparse, embedded in its own file: `RW n SPARSE "NAME.vmdk"`.
    MonolithicSparse,
    /// Hosted flat in 2 GiB pieces: `RW n FLAT "NAME-f001.vmdk" 0`, one line per extent.
    TwoGbMaxExtentFlat,
}

impl CreateType {
    pub fn as_str(self) -> &'static str {
        match self {
            CreateType::Vmfs => "vmfs",
            CreateType::MonolithicFlat => "monolithicFlat",
            CreateType::MonolithicSparse => "monolithicSparse",
            CreateType::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
        }
    }

    /// Whether the layout may have more than one extent.
    fn split(self) -> bool {
        self == CreateType::TwoGbMaxExtentFlat
    }

    /// The extent type word of this layout.
    fn extent_kind(self) -> &'static str {
        match self {
            CreateType::Vmfs => "VMFS",
            CreateType::MonolithicFlat | CreateType::TwoGbMaxExtentFlat => "FLAT",
            CreateType::MonolithicSparse => "SPARSE",
        }
    }

    fn parse(s: &str) -> Result<Self, DescriptorError> {
        match s {
            "vmfs" => Ok(CreateType::Vmfs),
            "monolithicFlat" => Ok(CreateType::MonolithicFlat),
            "monolithicSparse" => Ok(CreateType::MonolithicSparse),
            "twoGbMaxExtentFlat" => Ok(CreateType::TwoGbMaxExtentFlat),
            other => Err(DescriptorError::UnsupportedCreateType(other.to_string())),
        }
    }
}

/// One extent line: `RW <sectors> <KIND> "<file>" [0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentSpec {
    pub sectors: u64,
    /// File name, relative to the descriptor's directory.
    pub file: String,
}

/// A parsed descriptor (see the module invariants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub cid: u32,
    pub create_type: CreateType,
    /// The extents in disk order (one, but for twoGbMaxExtentFlat).
    pub extents: Vec<ExtentSpec>,
    /// Header keys other than version/CID/parentCID/createType, in file order.
    pub header_extra: Vec<(String, String)>,
    /// `ddb.*` entries in file order, keys without the `ddb.` prefix.
    pub ddb: Vec<(String, String)>,
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(v)
}

fn writable(s: &str) -> Result<&str, DescriptorError> {
    if s.contains(['"', '\n', '\r', '\0']) {
        return Err(DescriptorError::Unwritable(s.to_string()));
    }
    Ok(s)
}

impl Descriptor {
    /// A ddb value by key (without the `ddb.` prefix).
    pub fn ddb_get(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets a ddb value, keeping its position if it exists, else appending it.
    pub fn ddb_set(&mut self, key: &str, value: String) {
        match self.ddb.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.ddb.push((key.to_string(), value)),
        }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.extents.iter().map(|e| e.sectors * 512).sum()
    }

    /// Parses a descriptor file's bytes and checks the module invariants.
    pub fn parse(bytes: &[u8]) -> Result<Descriptor, DescriptorError> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(DescriptorError::TooLarge);
        }
        if bytes.contains(&0) || bytes.starts_with(b"KDMV") {
            return Err(DescriptorError::Binary);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DescriptorError::Binary)?;
        let mut raw = RawDescriptor::scan(text)?;
        let cid = raw.cid.ok_or(DescriptorError::MissingKey("CID"))?;
        let parent_cid = raw
            .parent_cid
            .ok_or(DescriptorError::MissingKey("parentCID"))?;
        if parent_cid != NO_PARENT_CID || raw.hint.is_some() {
            return Err(DescriptorError::Delta {
                parent_cid,
                hint: raw
                    .hint
                    .map(|h| format!(", parentFileNameHint=\"{h}\""))
                    .unwrap_or_default(),
            });
        }
        let create_type = CreateType::parse(
            &raw.create_type
                .ok_or(DescriptorError::MissingKey("createType"))?,
        )?;
        let n = raw.extents.len();
        if n == 0 || (n > 1 && !create_type.split()) {
            return Err(DescriptorError::ExtentCount(n));
        }
        let mut extents = Vec::with_capacity(n);
        for e in std::mem::take(&mut raw.extents) {
            if e.access != "RW" {
                return Err(DescriptorError::NotReadWrite(e.access));
            }
            if e.kind != create_type.extent_kind() {
                return Err(DescriptorError::ExtentKind {
                    kind: e.kind,
                    create_type: create_type.as_str().to_string(),
                });
            }
            check_extent_file(&e.file)?;
            if let Some(offset @ 1..) = e.offset {
                return Err(DescriptorError::ExtentOffset(offset));
            }
            extents.push(ExtentSpec {
                sectors: e.sectors,
                file: e.file,
            });
        }
        Ok(Descriptor {
            cid,
            create_type,
            extents,
            header_extra: raw.header_extra,
            ddb: raw.ddb,
        })
    }

    /// The descriptor text, as VMware and qemu expect it (see the module docs).
    pub fn render(&self) -> Result<String, DescriptorError> {
        let mut s = String::from("# Disk DescriptorFile\nversion=1\n");
        for (k, v) in &self.header_extra {
            if k.contains("CID") || v.contains("CID") || k.contains(['=', ' ']) {
                return Err(DescriptorError::Unwritable(k.clone()));
            }
            let _ = writeln!(s, "{}=\"{}\"", writable(k)?, writable(v)?);
        }
        let _ = writeln!(s, "CID={:08x}", self.cid);
        let _ = writeln!(s, "parentCID={NO_PARENT_CID:08x}");
        let _ = writeln!(s, "createType=\"{}\"", self.create_type.as_str());
        s.push_str("\n# Extent description\n");
        let kind = self.create_type.extent_kind();
        for e in &self.extents {
            check_extent_file(&e.file)?;
            let file = writable(&e.file)?;
            let _ = write!(s, "RW {} {kind} \"{file}\"", e.sectors);
            // FLAT lines need the offset, VMFS lines must not have one (VMDK-NOTES.md (a)).
            s.push_str(if kind == "FLAT" { " 0\n" } else { "\n" });
        }
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        for (k, v) in &self.ddb {
            if k.contains(['=', ' ']) || k.is_empty() {
                return Err(DescriptorError::Unwritable(k.clone()));
            }
            let _ = writeln!(s, "ddb.{} = \"{}\"", writable(k)?, writable(v)?);
        }
        Ok(s)
    }
}

/// A descriptor's lines sorted by kind, before any semantic check.
#[derive(Default)]
struct RawDescriptor {
    cid: Option<u32>,
    parent_cid: Option<u32>,
    create_type: Option<String>,
    hint: Option<String>,
    extents: Vec<ExtentLine>,
    header_extra: Vec<(String, String)>,
    ddb: Vec<(String, String)>,
}

impl RawDescriptor {
    /// Reads every line: `version=1` first, then extents, `ddb.*` and header keys.
    fn scan(text: &str) -> Result<RawDescriptor, DescriptorError> {
        let mut r = RawDescriptor::default();
        let mut seen_version = false;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            let bad = |reason: &str| DescriptorError::BadLine {
                line: i + 1,
                reason: reason.to_string(),
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if !seen_version {
                let v = line
                    .strip_prefix("version=")
                    .ok_or(DescriptorError::MissingVersion)?
                    .trim();
                if v != "1" {
                    return Err(DescriptorError::UnsupportedVersion(v.to_string()));
                }
                seen_version = true;
            } else if ["RW ", "RDONLY ", "NOACCESS "]
                .iter()
                .any(|p| line.starts_with(p))
            {
                r.extents.push(parse_extent(line).map_err(|e| bad(&e))?);
            } else {
                let (key, value) = line
                    .split_once('=')
                    .ok_or_else(|| bad("expected key=value"))?;
                r.key_value(key.trim(), unquote(value))
                    .map_err(|e| bad(&e))?;
            }
        }
        if !seen_version {
            return Err(DescriptorError::MissingVersion);
        }
        Ok(r)
    }

    fn key_value(&mut self, key: &str, value: &str) -> Result<(), String> {
        let hex = |v: &str| u32::from_str_radix(v, 16).map_err(|_| format!("bad hex {key}"));
        match key {
            "CID" => self.cid = Some(hex(value)?),
            "parentCID" => self.parent_cid = Some(hex(value)?),
            "createType" => self.create_type = Some(value.to_string()),
            "parentFileNameHint" => self.hint = Some(value.to_string()),
            _ => match key.strip_prefix("ddb.") {
                Some(k) => self.ddb.push((k.to_string(), value.to_string())),
                None => self.header_extra.push((key.to_string(), value.to_string())),
            },
        }
        Ok(())
    }
}

struct ExtentLine {
    access: String,
    sectors: u64,
    kind: String,
    file: String,
    offset: Option<u64>,
}

/// `ACCESS SECTORS KIND "FILE" [OFFSET]`
fn parse_extent(line: &str) -> Result<ExtentLine, String> {
    let (head, rest) = line
        .split_once('"')
        .ok_or("extent line without a quoted file name")?;
    let (file, tail) = rest
        .split_once('"')
        .ok_or("extent file name is not closed by a quote")?;
    let mut words = head.split_whitespace();
    let (Some(access), Some(sectors), Some(kind), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err("expected ACCESS SECTORS TYPE \"FILE\" [OFFSET]".into());
    };
    let sectors: u64 = sectors
        .parse()
        .map_err(|_| format!("bad sector count {sectors}"))?;
    let offset = match tail.trim() {
        "" => None,
        o => Some(o.parse().map_err(|_| format!("bad extent offset {o}"))?),
    };
    Ok(ExtentLine {
        access: access.to_string(),
        sectors,
        kind: kind.to_string(),
        file: file.to_string(),
        offset,
    })
}

/// An extent file must be a relative path that cannot leave the descriptor's directory.
fn check_extent_file(file: &str) -> Result<(), DescriptorError> {
    let escapes = file.is_empty()
        || file.starts_with('/')
        || file.split(['/', '\\']).any(|c| c == ".." || c.is_empty());
    if escapes {
        return Err(DescriptorError::ExtentEscapes(file.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const QEMU_FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=5ae8c4ca\nparentCID=ffffffff\n\
        createType=\"monolithicFlat\"\n\n# Extent description\nRW 2048 FLAT \"f-flat.vmdk\" 0\n\n\
        # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_a_qemu_monolithic_flat_descriptor() {
        let d = Descriptor::parse(QEMU_FLAT.as_bytes()).unwrap();
        assert_eq!(d.cid, 0x5ae8c4ca);
        assert_eq!(d.create_type, CreateType::MonolithicFlat);
        assert_eq!(d.capacity(), 2048 * 512);
        assert_eq!(
            d.extents,
            [ExtentSpec {
                sectors: 2048,
                file: "f-flat.vmdk".into()
            }]
        );
        assert_eq!(d.ddb_get("adapterType"), Some("ide"));
    }

    #[test]
    fn parses_and_renders_a_qemu_two_gb_max_extent_flat_descriptor() {
        let t = QEMU_FLAT
            .replace("monolithicFlat", "twoGbMaxExtentFlat")
            .replace(
                "RW 2048 FLAT \"f-flat.vmdk\" 0\n",
                "RW 4194304 FLAT \"t-f001.vmdk\" 0\nRW 2048 FLAT \"t-f002.vmdk\" 0\n",
            );
        let d = Descriptor::parse(t.as_bytes()).unwrap();
        assert_eq!(d.create_type, CreateType::TwoGbMaxExtentFlat);
        assert_eq!(d.capacity(), (4194304 + 2048) * 512);
        let files: Vec<_> = d.extents.iter().map(|e| e.file.as_str()).collect();
        assert_eq!(files, ["t-f001.vmdk", "t-f002.vmdk"]);
        let text = d.render().unwrap();
        assert!(
            text.contains("RW 4194304 FLAT \"t-f001.vmdk\" 0\nRW 2048 FLAT \"t-f002.vmdk\" 0\n"),
            "{text}"
        );
        assert_eq!(Descriptor::parse(text.as_bytes()).unwrap(), d);
        // Other layouts keep exactly one extent.
        let two = QEMU_FLAT.replace(
            "RW 2048 FLAT \"f-flat.vmdk\" 0\n",
            "RW 2048 FLAT \"a.vmdk\" 0\nRW 2048 FLAT \"b.vmdk\" 0\n",
        );
        assert_eq!(
            Descriptor::parse(two.as_bytes()),
            Err(DescriptorError::ExtentCount(2))
        );
    }

    #[test]
    fn refuses_delta_disks() {
        let t = QEMU_FLAT.replace("parentCID=ffffffff", "parentCID=12345678");
        assert!(matches!(
            Descriptor::parse(t.as_bytes()),
            Err(DescriptorError::Delta { .. })
        ));
        let t = QEMU_FLAT.replace("createType", "parentFileNameHint=\"base.vmdk\"\ncreateType");
        assert!(matches!(
            Descriptor::parse(t.as_bytes()),
            Err(DescriptorError::Delta { .. })
        ));
    }

    #[test]
    fn refuses_unknown_create_type_and_read_only_extents() {
        let t = QEMU_FLAT.replace("monolithicFlat", "twoGbMaxExtentSparse");
        assert!(matches!(
            Descriptor::parse(t.as_bytes()),
            Err(DescriptorError::UnsupportedCreateType(_))
        ));
        let t = QEMU_FLAT.replace("RW 2048", "RDONLY 2048");
        assert!(matches!(
            Descriptor::parse(t.as_bytes()),
            Err(DescriptorError::NotReadWrite(_))
        ));
    }

    #[test]
    fn refuses_extent_files_that_leave_the_datastore() {
        for bad in ["/etc/passwd", "../x-flat.vmdk", "a/../../b", "a//b"] {
            let t = QEMU_FLAT.replace("f-flat.vmdk", bad);
            assert!(
                matches!(
                    Descriptor::parse(t.as_bytes()),
                    Err(DescriptorError::ExtentEscapes(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn refuses_binary_sparse_images() {
        assert_eq!(
            Descriptor::parse(b"KDMV\x01\0\0\0"),
            Err(DescriptorError::Binary)
        );
    }

    #[test]
    fn renders_cid_above_parent_cid() {
        let d = Descriptor::parse(QEMU_FLAT.as_bytes()).unwrap();
        let text = d.render().unwrap();
        assert!(text.find("CID=").unwrap() < text.find("parentCID=").unwrap());
        assert_eq!(text.find("CID"), text.find("CID="));
    }

    fn arb_descriptor() -> impl Strategy<Value = Descriptor> {
        let kv = || ("[a-zA-Z][a-zA-Z0-9.]{0,15}", "[ -!#-~]{0,30}");
        (
            any::<u32>(),
            any::<bool>(),
            1u64..(1 << 37),
            "[a-z0-9_-]{1,20}-flat\\.vmdk",
            prop::collection::vec(kv(), 0..3),
            prop::collection::vec(kv(), 0..8),
        )
            .prop_map(|(cid, vmfs, sectors, file, extra, ddb)| Descriptor {
                cid,
                create_type: if vmfs {
                    CreateType::Vmfs
                } else {
                    CreateType::MonolithicFlat
                },
                extents: vec![ExtentSpec { sectors, file }],
                header_extra: extra
                    .into_iter()
                    .filter(|(k, v)| !k.contains("CID") && !v.contains("CID"))
                    .map(|(k, v)| (format!("x{k}"), v.trim().to_string()))
                    .collect(),
                ddb: ddb
                    .into_iter()
                    .map(|(k, v)| (k, v.trim().to_string()))
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn render_then_parse_round_trips(d in arb_descriptor()) {
            let text = d.render().unwrap();
            prop_assert_eq!(Descriptor::parse(text.as_bytes()).unwrap(), d);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Arbitrary bytes parse or are refused, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Descriptor::parse(&bytes);
        }

        /// Descriptor-like lines in any order and with any values (the parser's hard
        /// paths: extents, quotes, numbers) never panic either.
        #[test]
        fn arbitrary_descriptor_lines_never_panic(
            lines in prop::collection::vec(prop_oneof![
                "(RW|RDONLY|NOACCESS) -?[0-9]{0,25} (FLAT|SPARSE|VMFS|ZERO)( \"[ -~]{0,20}\"?)?( -?[0-9]{0,22})?",
                "(CID|parentCID|version|createType|ddb\\.[a-zA-Z.]{1,12}|encoding) *= *\"?[ -~]{0,24}",
                "[ -~]{0,40}",
            ], 0..12)
        ) {
            let text = format!("# Disk DescriptorFile\n{}\n", lines.join("\n"));
            if let Ok(d) = Descriptor::parse(text.as_bytes()) {
                let _ = d.render();
            }
        }
    }
}
