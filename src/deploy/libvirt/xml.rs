//! Reading and editing the domain XML that libvirt hands the hook on stdin.
//!
//! Reading goes through `roxmltree`. The one edit (adding the sidecar's QMP monitor for
//! the `migrate` filter) splices text at the byte positions roxmltree reports, so
//! everything else in the document, libvirt's formatting included, is kept byte for byte.

use std::ops::Range;
use std::path::{Path, PathBuf};

/// Our namespace, for the `<metadata>` element that marks a domain for the sidecar.
pub const NS: &str = "urn:postcopy-sidecar:1";
/// libvirt's namespace for `<qemu:commandline>`.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// The QEMU chardev id of the sidecar's monitor.
pub const MONITOR_ID: &str = "postcopy-sidecar";
/// The block the memory check asks for, exactly as a user pastes it.
pub const MEMFD_XML: &str =
    "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>";

/// Why the domain XML could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XmlError {
    /// Not XML.
    #[error("the domain XML does not parse: {0}")]
    Parse(String),
    /// XML, but not a libvirt domain.
    #[error("the document's root is <{0}>, not <domain>")]
    NotADomain(String),
}

/// Guest RAM the sidecar cannot serve, with what was found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "guest RAM of domain '{domain}' is not in a shared memfd ({found}); postcopy through the \
     sidecar needs {MEMFD_XML} in the domain XML: add it on the source (virsh edit {domain}) \
     and restart the domain there, then migrate"
)]
pub struct MemoryError {
    /// The domain's name.
    pub domain: String,
    /// What the XML says instead, e.g. `no <memoryBacking><source>, access private`.
    pub found: String,
}

/// `<metadata><sidecar xmlns='urn:postcopy-sidecar:1' .../></metadata>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Marker {
    /// `listen='ADDR'`: where this domain's sidecar listens (overrides the config).
    pub listen: Option<String>,
}

/// A parsed domain XML.
pub struct DomainXml<'a> {
    text: &'a str,
    doc: roxmltree::Document<'a>,
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().namespace().is_none() && c.has_tag_name(name))
}

/// One `-chardev` option value for a socket monitor at `path` (commas doubled, as QEMU's
/// option syntax wants).
pub fn chardev_arg(path: &Path) -> String {
    format!(
        "socket,id={MONITOR_ID},path={},server=on,wait=off",
        path.to_string_lossy().replace(',', ",,")
    )
}

/// The `-mon` value that makes [`chardev_arg`] a QMP monitor.
pub fn mon_arg() -> String {
    format!("chardev={MONITOR_ID},mode=control")
}

/// The socket path in a [`chardev_arg`] value, or `None` for any other value.
fn chardev_path(value: &str) -> Option<PathBuf> {
    let rest = value.strip_prefix(&format!("socket,id={MONITOR_ID},path="))?;
    // QEMU options: `,,` is a literal comma, a single comma ends the value.
    let mut path = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
            } else {
                break;
            }
        }
        path.push(c);
    }
    Some(PathBuf::from(path))
}

fn xml_attr_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

impl<'a> DomainXml<'a> {
    /// Parses `text`, which must be a `<domain>` document.
    pub fn parse(text: &'a str) -> Result<DomainXml<'a>, XmlError> {
        let doc = roxmltree::Document::parse(text).map_err(|e| XmlError::Parse(e.to_string()))?;
        let root = doc.root_element();
        if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
            return Err(XmlError::NotADomain(root.tag_name().name().to_string()));
        }
        Ok(DomainXml { text, doc })
    }

    fn root(&self) -> roxmltree::Node<'_, 'a> {
        self.doc.root_element()
    }

    /// `<name>`.
    pub fn name(&self) -> Option<&str> {
        child(self.root(), "name").and_then(|n| n.text())
    }

    /// Our marker in `<metadata>`, if the domain has one.
    pub fn marker(&self) -> Option<Marker> {
        let md = child(self.root(), "metadata")?;
        let m = md
            .children()
            .find(|c| c.is_element() && c.tag_name().namespace() == Some(NS))?;
        Some(Marker {
            listen: m.attribute("listen").map(str::to_string),
        })
    }

    /// Checks that guest RAM is a shared memfd: `<memoryBacking>` with `<source
    /// type='memfd'/>` and `<access mode='shared'/>`, with no NUMA cell or memory device
    /// overriding the access to private.
    pub fn check_memory(&self) -> Result<(), MemoryError> {
        let root = self.root();
        let mb = child(root, "memoryBacking");
        let source = mb
            .and_then(|m| child(m, "source"))
            .and_then(|s| s.attribute("type"));
        let access = mb
            .and_then(|m| child(m, "access"))
            .and_then(|a| a.attribute("mode"))
            .unwrap_or("private");
        let mut problems = Vec::new();
        match source {
            Some("memfd") => {}
            Some(other) => problems.push(format!("<source type='{other}'/>")),
            None => problems.push("no <memoryBacking><source>".to_string()),
        }
        // NUMA cells and memory devices may each set their own access; only an explicit
        // private one overrides a shared default, and a missing default is private.
        let cells: Vec<_> = child(root, "cpu")
            .and_then(|c| child(c, "numa"))
            .map(|n| {
                n.children()
                    .filter(|c| c.is_element() && c.has_tag_name("cell"))
                    .collect()
            })
            .unwrap_or_default();
        let cell_access = |c: &roxmltree::Node<'_, 'a>| -> String {
            c.attribute("memAccess").unwrap_or(access).to_string()
        };
        if cells.is_empty() {
            if access != "shared" {
                problems.push(format!("access {access}"));
            }
        } else {
            for c in &cells {
                if cell_access(c) != "shared" {
                    problems.push(format!(
                        "NUMA cell {} access {}",
                        c.attribute("id").unwrap_or("?"),
                        cell_access(c)
                    ));
                }
            }
        }
        if let Some(devs) = child(root, "devices") {
            for m in devs
                .children()
                .filter(|c| c.is_element() && c.has_tag_name("memory"))
            {
                let a = m.attribute("access").unwrap_or(access);
                if a != "shared" {
                    problems.push(format!(
                        "<memory model='{}'> access {a}",
                        m.attribute("model").unwrap_or("?")
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(MemoryError {
                domain: self.name().unwrap_or("?").to_string(),
                found: problems.join(", "),
            })
        }
    }

    /// `<seclabel model='dac'><label>+UID:+GID</label>`: who QEMU runs as (present from the
    /// `start` event on).
    pub fn dac_label(&self) -> Option<(u32, u32)> {
        let sl = self.root().children().find(|c| {
            c.is_element() && c.has_tag_name("seclabel") && c.attribute("model") == Some("dac")
        })?;
        let label = child(sl, "label")?.text()?;
        let (u, g) = label.split_once(':')?;
        let id = |s: &str| s.trim().trim_start_matches('+').parse::<u32>().ok();
        Some((id(u)?, id(g)?))
    }

    /// `<qemu:arg>` elements, in order.
    fn qemu_args(&self) -> Vec<roxmltree::Node<'_, 'a>> {
        self.root()
            .children()
            .filter(|c| c.is_element() && c.tag_name().namespace() == Some(QEMU_NS))
            .filter(|c| c.tag_name().name() == "commandline")
            .flat_map(|c| c.children())
            .filter(|a| {
                a.is_element()
                    && a.tag_name().namespace() == Some(QEMU_NS)
                    && a.tag_name().name() == "arg"
            })
            .collect()
    }

    /// The socket path of the sidecar's monitor, when the XML already carries it.
    pub fn monitor_path(&self) -> Option<PathBuf> {
        self.qemu_args()
            .iter()
            .find_map(|a| a.attribute("value").and_then(chardev_path))
    }

    /// The byte ranges to remove for our monitor: our four `<qemu:arg>`s (`-chardev VALUE
    /// -mon VALUE`), or their whole `<qemu:commandline>` when it holds nothing else.
    fn our_arg_ranges(&self) -> Vec<Range<usize>> {
        let is_ours = |a: &roxmltree::Node| {
            let v = a.attribute("value").unwrap_or("");
            chardev_path(v).is_some() || v == mon_arg()
        };
        let mut out = Vec::new();
        for cl in self.root().children().filter(|c| {
            c.is_element()
                && c.tag_name().namespace() == Some(QEMU_NS)
                && c.tag_name().name() == "commandline"
        }) {
            let elems: Vec<_> = cl.children().filter(|c| c.is_element()).collect();
            let mut ours = Vec::new();
            for (i, a) in elems.iter().enumerate() {
                if a.tag_name().name() == "arg" && is_ours(a) {
                    ours.push(a.range());
                    if let Some(prev) = i.checked_sub(1).map(|p| elems[p])
                        && matches!(prev.attribute("value"), Some("-chardev" | "-mon"))
                    {
                        ours.push(prev.range());
                    }
                }
            }
            if !ours.is_empty() && ours.len() == elems.len() {
                out.push(cl.range());
            } else {
                out.extend(ours);
            }
        }
        out
    }

    /// The document with the sidecar's QMP monitor at `path` (and no other monitor of
    /// ours): `-chardev socket,id=postcopy-sidecar,path=PATH,server=on,wait=off -mon
    /// chardev=postcopy-sidecar,mode=control` in a `<qemu:commandline>`, declaring libvirt's
    /// qemu namespace on `<domain>` when it is not declared yet.
    pub fn with_monitor(&self, path: &Path) -> String {
        let root = self.root();
        let prefix = root.lookup_prefix(QEMU_NS);
        let (prefix, declare) = match prefix {
            Some(p) if !p.is_empty() => (p.to_string(), false),
            // Unprefixed (default namespace) cannot be: <domain> itself has no namespace.
            _ => {
                let taken = root.lookup_namespace_uri(Some("qemu")).is_some();
                let p = if taken {
                    "postcopy-sidecar-qemu"
                } else {
                    "qemu"
                };
                (p.to_string(), true)
            }
        };
        let args = [
            "-chardev".to_string(),
            chardev_arg(path),
            "-mon".to_string(),
            mon_arg(),
        ];
        let mut block = format!("  <{prefix}:commandline>\n");
        for a in &args {
            block.push_str(&format!(
                "    <{prefix}:arg value='{}'/>\n",
                xml_attr_escape(a)
            ));
        }
        block.push_str(&format!("  </{prefix}:commandline>\n"));

        // Edits as (range, replacement), applied from the end so earlier offsets hold.
        let mut edits: Vec<(Range<usize>, String)> = self
            .our_arg_ranges()
            .into_iter()
            .map(|r| (self.whole_line(r), String::new()))
            .collect();
        // Before `</domain>`: the last child (usually the whitespace text before the end
        // tag) ends exactly where the end tag starts.
        let end = root
            .last_child()
            .map(|c| c.range().end)
            .unwrap_or(root.range().end);
        let lead = if self.text[..end].ends_with('\n') {
            ""
        } else {
            "\n"
        };
        edits.push((end..end, format!("{lead}{block}")));
        if declare {
            // Right after `<domain`: parse() checked the root is an unprefixed `domain`.
            let at = root.range().start + "<domain".len();
            edits.push((at..at, format!(" xmlns:{prefix}='{QEMU_NS}'")));
        }
        edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
        let mut out = self.text.to_string();
        for (r, s) in edits {
            out.replace_range(r, &s);
        }
        out
    }

    /// `r` widened to its whole line when nothing but whitespace shares the line with it,
    /// so that removing an element leaves no blank line behind.
    fn whole_line(&self, r: Range<usize>) -> Range<usize> {
        let t = self.text;
        let line_start = t[..r.start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = t[r.end..].find('\n').map_or(t.len(), |i| r.end + i + 1);
        let alone =
            t[line_start..r.start].trim().is_empty() && t[r.end..line_end].trim().is_empty();
        if alone { line_start..line_end } else { r }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMFD: &str = "<domain type='qemu'>
  <name>t1</name>
  <memory unit='KiB'>262144</memory>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <metadata>
    <ps:sidecar xmlns:ps='urn:postcopy-sidecar:1' listen='192.0.2.7'/>
  </metadata>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
  </seclabel>
</domain>
";

    #[test]
    fn reads_name_marker_and_dac_label() {
        let x = DomainXml::parse(MEMFD).unwrap();
        assert_eq!(x.name(), Some("t1"));
        assert_eq!(
            x.marker(),
            Some(Marker {
                listen: Some("192.0.2.7".into())
            })
        );
        assert_eq!(x.dac_label(), Some((64055, 64055)));
        assert_eq!(x.check_memory(), Ok(()));
        assert_eq!(x.monitor_path(), None);
    }

    #[test]
    fn rejects_what_is_not_a_domain() {
        assert!(matches!(
            DomainXml::parse("<domain"),
            Err(XmlError::Parse(_))
        ));
        assert_eq!(
            DomainXml::parse("<network/>").err(),
            Some(XmlError::NotADomain("network".into()))
        );
    }

    #[test]
    fn memory_check_names_what_to_add() {
        let plain = "<domain><name>vm</name><memory>1</memory></domain>";
        let e = DomainXml::parse(plain).unwrap().check_memory().unwrap_err();
        assert_eq!(e.found, "no <memoryBacking><source>, access private");
        let msg = e.to_string();
        assert!(msg.contains(MEMFD_XML), "{msg}");
        assert!(msg.contains("virsh edit vm"), "{msg}");

        let file = "<domain><name>vm</name><memoryBacking><source type='file'/>\
                    <access mode='shared'/></memoryBacking></domain>";
        let e = DomainXml::parse(file).unwrap().check_memory().unwrap_err();
        assert_eq!(e.found, "<source type='file'/>");

        let private = "<domain><name>vm</name><memoryBacking><source type='memfd'/>\
                       </memoryBacking></domain>";
        let e = DomainXml::parse(private)
            .unwrap()
            .check_memory()
            .unwrap_err();
        assert_eq!(e.found, "access private");
    }

    #[test]
    fn numa_cells_and_memory_devices_can_override_access() {
        let numa = "<domain><name>vm</name><memoryBacking><source type='memfd'/>\
            <access mode='shared'/></memoryBacking><cpu><numa>\
            <cell id='0' memory='1'/><cell id='1' memory='1' memAccess='private'/>\
            </numa></cpu></domain>";
        let e = DomainXml::parse(numa).unwrap().check_memory().unwrap_err();
        assert_eq!(e.found, "NUMA cell 1 access private");

        let cells_shared = "<domain><name>vm</name><memoryBacking><source type='memfd'/>\
            </memoryBacking><cpu><numa><cell id='0' memAccess='shared'/></numa></cpu></domain>";
        assert_eq!(
            DomainXml::parse(cells_shared).unwrap().check_memory(),
            Ok(())
        );

        let dimm = "<domain><name>vm</name><memoryBacking><source type='memfd'/>\
            <access mode='shared'/></memoryBacking><devices>\
            <memory model='dimm' access='private'/></devices></domain>";
        let e = DomainXml::parse(dimm).unwrap().check_memory().unwrap_err();
        assert_eq!(e.found, "<memory model='dimm'> access private");
    }

    #[test]
    fn injects_the_monitor_and_declares_the_namespace() {
        let x = DomainXml::parse(MEMFD).unwrap();
        let p = Path::new("/run/postcopy-sidecar/t1/qemu/qmp.sock");
        let out = x.with_monitor(p);
        let expected = MEMFD.replacen(
            "<domain type='qemu'>",
            "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' type='qemu'>",
            1,
        );
        let expected = expected.replace(
            "</domain>\n",
            "  <qemu:commandline>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=postcopy-sidecar,path=/run/postcopy-sidecar/t1/qemu/qmp.sock,server=on,wait=off'/>
    <qemu:arg value='-mon'/>
    <qemu:arg value='chardev=postcopy-sidecar,mode=control'/>
  </qemu:commandline>
</domain>\n",
        );
        assert_eq!(out, expected);
        let again = DomainXml::parse(&out).unwrap();
        assert_eq!(again.monitor_path().as_deref(), Some(p));
        // Injecting the same monitor again changes nothing.
        assert_eq!(again.with_monitor(p), out);
    }

    #[test]
    fn replaces_a_monitor_of_ours_with_another_path_and_keeps_foreign_args() {
        let src = "<domain type='kvm' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>a,b</name>
  <q:commandline>
    <q:arg value='-chardev'/>
    <q:arg value='socket,id=postcopy-sidecar,path=/old/a,,b.sock,server=on,wait=off'/>
    <q:arg value='-mon'/>
    <q:arg value='chardev=postcopy-sidecar,mode=control'/>
    <q:arg value='-d'/>
    <q:arg value='guest_errors'/>
  </q:commandline>
</domain>";
        let x = DomainXml::parse(src).unwrap();
        assert_eq!(x.monitor_path(), Some(PathBuf::from("/old/a,b.sock")));
        let out = x.with_monitor(Path::new("/new/a,b & c.sock"));
        assert_eq!(
            out,
            "<domain type='kvm' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>a,b</name>
  <q:commandline>
    <q:arg value='-d'/>
    <q:arg value='guest_errors'/>
  </q:commandline>
  <q:commandline>
    <q:arg value='-chardev'/>
    <q:arg value='socket,id=postcopy-sidecar,path=/new/a,,b &amp; c.sock,server=on,wait=off'/>
    <q:arg value='-mon'/>
    <q:arg value='chardev=postcopy-sidecar,mode=control'/>
  </q:commandline>
</domain>"
        );
        let again = DomainXml::parse(&out).unwrap();
        assert_eq!(
            again.monitor_path(),
            Some(PathBuf::from("/new/a,b & c.sock"))
        );
    }
}
