//! The guest's NUMA topology from the command line: how many nodes, how
//! much memory each, which vCPUs on which.

use crate::size::parse_size;
use guest_protocol::layout::MAX_VCPUS;
use guest_protocol::numa::{NumaLayout, MAX_NODES};

/// Node sizes are rounded to this when RAM is split evenly.
const NODE_ALIGN: u64 = 2 << 20;

/// One node of a `--numa-layout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Bytes of guest RAM.
    pub bytes: u64,
    /// Its vCPUs (`None`: given out in blocks, as `--numa-nodes` does).
    pub vcpus: Option<Vec<u32>>,
}

/// A parsed `--numa-layout`: its nodes in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLayout(pub Vec<NodeSpec>);

/// What the command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NumaSpec {
    /// `--numa-nodes N`: RAM split evenly (2 MiB multiples, the rest to the
    /// last node), vCPUs in consecutive blocks.
    Nodes(u32),
    /// `--numa-layout SIZE[:VCPUS],...`.
    Layout(Vec<NodeSpec>),
}

/// A topology the VM cannot have.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    /// Zero nodes, or too many.
    #[error("--numa-nodes {0} is out of range: 1 to {MAX_NODES}")]
    NodeCount(u32),
    /// `--numa-layout` does not parse.
    #[error("--numa-layout {0:?}: {1}")]
    Syntax(String, String),
    /// The node sizes do not add up to `--mem`.
    #[error("--numa-layout's nodes add up to {0} bytes, but --mem is {1} bytes")]
    Sum(u64, u64),
    /// A node size that is zero or not a page multiple.
    #[error("NUMA node {0}: {1} bytes is not a positive multiple of 4 KiB")]
    NodeSize(usize, u64),
    /// Too little RAM for the nodes asked for.
    #[error("--mem {0} bytes is too small for {1} NUMA nodes")]
    TooSmall(u64, u32),
    /// A vCPU on no node, on two, or one that does not exist.
    #[error("--numa-layout: {0}")]
    Vcpus(String),
}

/// Parses `--numa-layout`: nodes separated by `,`, each a size with an
/// optional `:` and its vCPUs (`0+2`, `0-3`, `0-1+6`).
pub fn parse_layout(s: &str) -> Result<Vec<NodeSpec>, TopologyError> {
    let bad = |why: String| TopologyError::Syntax(s.to_string(), why);
    let mut nodes = Vec::new();
    for part in s.split(',') {
        let (size, cpus) = match part.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (part, None),
        };
        let bytes = parse_size(size).map_err(|e| bad(e.to_string()))?;
        let vcpus = cpus
            .map(|list| {
                let mut out = Vec::new();
                for item in list.split('+') {
                    let num = |t: &str| {
                        t.trim()
                            .parse::<u32>()
                            .map_err(|_| bad(format!("{t:?} is not a vCPU number")))
                    };
                    match item.split_once('-') {
                        Some((a, b)) => {
                            let (a, b) = (num(a)?, num(b)?);
                            if a > b {
                                return Err(bad(format!("vCPU range {item:?} runs backwards")));
                            }
                            out.extend(a..=b.min(a.saturating_add(MAX_VCPUS as u32)));
                        }
                        None => out.push(num(item)?),
                    }
                }
                Ok(out)
            })
            .transpose()?;
        nodes.push(NodeSpec { bytes, vcpus });
    }
    if nodes.len() > MAX_NODES {
        return Err(TopologyError::NodeCount(nodes.len() as u32));
    }
    Ok(nodes)
}

/// vCPU `v` of `vcpus` in consecutive blocks over `nodes` nodes.
fn block_node(v: u32, vcpus: u32, nodes: u32) -> u8 {
    (v as u64 * nodes as u64 / vcpus.max(1) as u64) as u8
}

impl NumaSpec {
    /// Node count.
    pub fn nodes(&self) -> u32 {
        match self {
            NumaSpec::Nodes(n) => *n,
            NumaSpec::Layout(l) => l.len() as u32,
        }
    }

    /// The guest topology for `mem_bytes` of RAM and `vcpus` vCPUs.
    pub fn resolve(&self, mem_bytes: u64, vcpus: u32) -> Result<NumaLayout, TopologyError> {
        let n = self.nodes();
        if n == 0 || n as usize > MAX_NODES {
            return Err(TopologyError::NodeCount(n));
        }
        let (sizes, vcpu_node): (Vec<u64>, Vec<u8>) = match self {
            NumaSpec::Nodes(n) => {
                let n = *n as u64;
                let mut each = mem_bytes / n / NODE_ALIGN * NODE_ALIGN;
                if each == 0 {
                    each = mem_bytes / n / 4096 * 4096;
                }
                if each == 0 {
                    return Err(TopologyError::TooSmall(mem_bytes, n as u32));
                }
                let mut sizes = vec![each; n as usize];
                sizes[n as usize - 1] = mem_bytes - each * (n - 1);
                let nodes = (0..vcpus).map(|v| block_node(v, vcpus, n as u32)).collect();
                (sizes, nodes)
            }
            NumaSpec::Layout(layout) => {
                let sum = layout
                    .iter()
                    .try_fold(0u64, |a, s| a.checked_add(s.bytes))
                    .unwrap_or(u64::MAX);
                if sum != mem_bytes {
                    return Err(TopologyError::Sum(sum, mem_bytes));
                }
                (
                    layout.iter().map(|s| s.bytes).collect(),
                    layout_vcpus(layout, vcpus)?,
                )
            }
        };
        if let Some((i, s)) = sizes
            .iter()
            .enumerate()
            .find(|(_, s)| **s == 0 || **s % 4096 != 0)
        {
            return Err(TopologyError::NodeSize(i, *s));
        }
        NumaLayout::new(&sizes, &vcpu_node)
            .map_err(|e| TopologyError::Vcpus(format!("the layout is not valid: {e:?}")))
    }
}

/// Each vCPU's node from a layout's vCPU lists: all given or none.
fn layout_vcpus(layout: &[NodeSpec], vcpus: u32) -> Result<Vec<u8>, TopologyError> {
    if layout.iter().all(|s| s.vcpus.is_none()) {
        let n = layout.len() as u32;
        return Ok((0..vcpus).map(|v| block_node(v, vcpus, n)).collect());
    }
    let mut node_of: Vec<Option<u8>> = vec![None; vcpus as usize];
    for (k, s) in layout.iter().enumerate() {
        for v in s.vcpus.iter().flatten() {
            let slot = node_of.get_mut(*v as usize).ok_or_else(|| {
                TopologyError::Vcpus(format!("node {k} lists vCPU {v}, but there are {vcpus}"))
            })?;
            if let Some(other) = slot.replace(k as u8) {
                return Err(TopologyError::Vcpus(format!(
                    "vCPU {v} is on nodes {other} and {k}"
                )));
            }
        }
    }
    node_of
        .iter()
        .enumerate()
        .map(|(v, n)| n.ok_or_else(|| TopologyError::Vcpus(format!("vCPU {v} is on no node"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_split_ram_evenly_and_vcpus_in_blocks() {
        let l = NumaSpec::Nodes(2).resolve(100 << 20, 4).unwrap();
        assert_eq!(l.ranges[0].bytes, 50 << 20);
        assert_eq!(l.ranges[1].gpa, 50 << 20);
        assert_eq!(&l.vcpu_node[..4], &[0, 0, 1, 1]);
        let l = NumaSpec::Nodes(3).resolve(101 << 20, 2).unwrap();
        assert_eq!(l.ranges[0].bytes, 32 << 20);
        assert_eq!(l.ranges[2].bytes, 37 << 20);
        assert_eq!(
            NumaSpec::Nodes(0).resolve(64 << 20, 1),
            Err(TopologyError::NodeCount(0))
        );
    }

    #[test]
    fn layouts_parse_and_are_checked() {
        let l = parse_layout("64M:0+2,192M:1-1+3").unwrap();
        assert_eq!(l[0].vcpus, Some(vec![0, 2]));
        assert_eq!(l[1].vcpus, Some(vec![1, 3]));
        let t = NumaSpec::Layout(l).resolve(256 << 20, 4).unwrap();
        assert_eq!(&t.vcpu_node[..4], &[0, 1, 0, 1]);
        assert!(matches!(
            parse_layout("64Q"),
            Err(TopologyError::Syntax(..))
        ));
        assert!(matches!(
            parse_layout("64M:x"),
            Err(TopologyError::Syntax(..))
        ));
        let spec = |s: &str| NumaSpec::Layout(parse_layout(s).unwrap());
        assert!(matches!(
            spec("64M,64M").resolve(256 << 20, 1),
            Err(TopologyError::Sum(..))
        ));
        assert!(matches!(
            spec("128M:0,128M:0").resolve(256 << 20, 1),
            Err(TopologyError::Vcpus(_))
        ));
        assert!(matches!(
            spec("128M:0,128M").resolve(256 << 20, 2),
            Err(TopologyError::Vcpus(_))
        ));
        assert!(matches!(
            spec("128M:5,128M").resolve(256 << 20, 2),
            Err(TopologyError::Vcpus(_))
        ));
        assert!(matches!(
            spec("1000,262143000").resolve(262144000, 1),
            Err(TopologyError::NodeSize(0, 1000))
        ));
    }
}
