//! Checks a KV checkpoint another node sent before llama.cpp sees any of it, cuts it to the
//! cells this engine loads, and compares the cells this engine computed itself with the
//! checkpoint's.
//!
//! A checkpoint is untrusted: it comes from a node. llama.cpp trusts the cell metadata it loads
//! (a cell at position `i32::MAX` survives `seq_rm(seq, -1, -1)`, one at -1 is never removed and
//! stays visible to attention), so the engine never hands it a foreign section. It parses the
//! section here, checks every field against what its own context exports ([`Shape`], learnt by
//! exporting a probe), and writes the metadata of the cells it loads itself: positions
//! `0..head`, one sequence.
//!
//! The layout (llama.cpp's `llama_kv_cache::state_write` / `state_read`, one stream's section,
//! native byte order):
//!
//! ```text
//! u32 cell_count
//! per cell: i32 pos, u32 n_seq_id, i32 seq_id × n_seq_id    (no per-cell extension: see below)
//! u32 v_trans, u32 n_layer, u32 n_rot_k, u32 n_rot_v
//! per layer, K:  i32 type, u64 row_size, cell_count × row_size bytes
//! per V layer, v_trans = 0: i32 type, u64 row_size, cell_count × row_size bytes
//!              v_trans = 1: i32 type, u32 el_size, u32 n_embd_v_gqa,
//!                           n_embd_v_gqa rows of cell_count × el_size bytes
//! ```
//!
//! Models whose cells carry llama.cpp's per-cell extension (M-RoPE positions, n-gram token ids)
//! do not parse as this layout: their probe fails and they never restore, they re-prefill.

/// The bytes of one cell's metadata: position, sequence count, one sequence id.
const CELL_META_BYTES: usize = 12;

/// The four words between the cells' metadata and the tensors: v_trans, n_layer, n_rot_k, n_rot_v.
const DATA_HEADER_WORDS: usize = 4;

/// ggml type ids whose elements are compared as numbers; other types are compared byte for byte.
const GGML_TYPE_F32: i32 = 0;
const GGML_TYPE_F16: i32 = 1;
const GGML_TYPE_BF16: i32 = 30;

/// Largest relative distance (L2 norm of the difference over the L2 norm of this engine's
/// values, per K or V tensor of a layer) between the cells this engine computed for the checked
/// positions and the checkpoint's cells for them. Honest nodes differ by float rounding at most
/// (nothing, on the same build and hardware); cells of another context differ by about 1.
pub(crate) const TAIL_DISTANCE_MAX: f64 = 0.05;

/// Why a section was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// Shorter or longer than its own fields say.
    Size,
    /// Its cell count is not the number of tokens it claims to cover.
    CellCount,
    /// A cell's position is not its index.
    Position,
    /// A cell belongs to no sequence or several, or to a negative one.
    Sequences,
    /// Layer count, tensor types or sizes are not this engine's.
    Shape,
}

/// One tensor's block in a section: `rows` rows of `cells × cell_bytes` bytes each (one row for
/// a K or untransposed V tensor, one per embedding for a transposed V tensor).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Block {
    /// The block's header as written (type, then row size or element size and width).
    header: Vec<u8>,
    ty: i32,
    rows: usize,
    cell_bytes: usize,
    /// Where its data starts in the section.
    offset: usize,
}

/// What every section this engine exports has in common, whatever its cell count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    data_header: [u32; DATA_HEADER_WORDS],
    /// Each block's header, rows and bytes per cell.
    blocks: Vec<(Vec<u8>, usize, usize)>,
}

/// A parsed section covering `cells` cells at positions `0..cells`.
#[derive(Debug)]
pub(crate) struct Section<'a> {
    bytes: &'a [u8],
    cells: usize,
    data_header: [u32; DATA_HEADER_WORDS],
    blocks: Vec<Block>,
}

/// Reads native-endian words with bounds checks.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(count).ok_or(Malformed::Size)?;
        let taken = self.bytes.get(self.at..end).ok_or(Malformed::Size)?;
        self.at = end;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let bytes = self.take(4)?;
        Ok(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn i32(&mut self) -> Result<i32, Malformed> {
        self.u32()
            .map(|word| i32::from_ne_bytes(word.to_ne_bytes()))
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let bytes = self.take(8)?;
        let mut word = [0_u8; 8];
        word.copy_from_slice(bytes);
        Ok(u64::from_ne_bytes(word))
    }

    fn usize_of(value: u64) -> Result<usize, Malformed> {
        usize::try_from(value).map_err(|_| Malformed::Size)
    }
}

impl<'a> Section<'a> {
    /// Parses `bytes` as a section of exactly `tokens` cells at positions `0..tokens`, each in
    /// exactly one sequence, whose blocks fill it exactly. With `shape`, its layer count, types
    /// and sizes must also be exactly those.
    pub(crate) fn parse(
        bytes: &'a [u8],
        tokens: usize,
        shape: Option<&Shape>,
    ) -> Result<Section<'a>, Malformed> {
        let mut reader = Reader { bytes, at: 0 };
        let cells = reader.u32()? as usize;
        if cells != tokens || cells == 0 {
            return Err(Malformed::CellCount);
        }
        // Sized first, so that a huge count fails before the loop runs.
        let meta_bytes = cells.checked_mul(CELL_META_BYTES).ok_or(Malformed::Size)?;
        if bytes.len() < 4 + meta_bytes {
            return Err(Malformed::Size);
        }
        for index in 0..cells {
            let position = reader.i32()?;
            if usize::try_from(position).ok() != Some(index) {
                return Err(Malformed::Position);
            }
            let sequences = reader.u32()?;
            let sequence = reader.i32()?;
            if sequences != 1 || sequence < 0 {
                return Err(Malformed::Sequences);
            }
        }
        let mut data_header = [0_u32; DATA_HEADER_WORDS];
        for word in &mut data_header {
            *word = reader.u32()?;
        }
        let [v_trans, layers, _, _] = data_header;
        if v_trans > 1 {
            return Err(Malformed::Shape);
        }
        let mut blocks = Vec::new();
        for _ in 0..layers {
            blocks.push(row_block(&mut reader, cells)?);
        }
        // V blocks follow until the end: layers without a V tensor write none.
        while reader.at < bytes.len() {
            let block = if v_trans == 1 {
                transposed_block(&mut reader, cells)?
            } else {
                row_block(&mut reader, cells)?
            };
            blocks.push(block);
        }
        let section = Section {
            bytes,
            cells,
            data_header,
            blocks,
        };
        if shape.is_some_and(|shape| *shape != section.shape()) {
            return Err(Malformed::Shape);
        }
        Ok(section)
    }

    /// What sections of this layout have in common.
    pub(crate) fn shape(&self) -> Shape {
        Shape {
            data_header: self.data_header,
            blocks: self
                .blocks
                .iter()
                .map(|block| (block.header.clone(), block.rows, block.cell_bytes))
                .collect(),
        }
    }

    /// A section holding only the first `head` cells: metadata written here (positions
    /// `0..head`, sequence 0), tensor rows copied.
    pub(crate) fn head(&self, head: usize) -> Vec<u8> {
        debug_assert!(head <= self.cells);
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(head).unwrap_or(u32::MAX).to_ne_bytes());
        for position in 0..head {
            out.extend_from_slice(&i32::try_from(position).unwrap_or(i32::MAX).to_ne_bytes());
            out.extend_from_slice(&1_u32.to_ne_bytes());
            out.extend_from_slice(&0_i32.to_ne_bytes());
        }
        for word in self.data_header {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        for block in &self.blocks {
            out.extend_from_slice(&block.header);
            for row in 0..block.rows {
                out.extend_from_slice(self.cells_of(block, row, 0..head));
            }
        }
        out
    }

    /// The bytes of cells `range` in row `row` of `block`.
    fn cells_of(&self, block: &Block, row: usize, range: std::ops::Range<usize>) -> &[u8] {
        let row_start = block.offset + row * self.cells * block.cell_bytes;
        &self.bytes
            [row_start + range.start * block.cell_bytes..row_start + range.end * block.cell_bytes]
    }

    /// The largest relative distance, over blocks, between this section's cells `from..` and
    /// `other`'s (both of the same shape and cell count), or infinity when a value is not finite.
    pub(crate) fn tail_distance(&self, other: &Section<'_>, from: usize) -> f64 {
        if self.cells != other.cells || self.shape() != other.shape() {
            return f64::INFINITY;
        }
        let mut worst = 0.0_f64;
        for (ours, theirs) in self.blocks.iter().zip(&other.blocks) {
            let (mut difference, mut norm) = (0.0_f64, 0.0_f64);
            for row in 0..ours.rows {
                let a = self.cells_of(ours, row, from..self.cells);
                let b = other.cells_of(theirs, row, from..other.cells);
                match compare_elements(ours.ty, a, b) {
                    Some((d, n)) => {
                        difference += d;
                        norm += n;
                    }
                    None => return f64::INFINITY,
                }
            }
            let distance = if difference == 0.0 {
                0.0
            } else if norm > 0.0 {
                (difference / norm).sqrt()
            } else {
                f64::INFINITY
            };
            worst = worst.max(distance);
        }
        worst
    }
}

/// A K block, or a V block that is not transposed: `i32 type, u64 row_size`, then the rows.
fn row_block(reader: &mut Reader<'_>, cells: usize) -> Result<Block, Malformed> {
    let start = reader.at;
    let ty = reader.i32()?;
    let cell_bytes = Reader::usize_of(reader.u64()?)?;
    finish_block(reader, start, ty, 1, cell_bytes, cells)
}

/// A transposed V block: `i32 type, u32 el_size, u32 n_embd_v_gqa`, then one row per embedding.
fn transposed_block(reader: &mut Reader<'_>, cells: usize) -> Result<Block, Malformed> {
    let start = reader.at;
    let ty = reader.i32()?;
    let cell_bytes = reader.u32()? as usize;
    let rows = reader.u32()? as usize;
    finish_block(reader, start, ty, rows, cell_bytes, cells)
}

fn finish_block(
    reader: &mut Reader<'_>,
    start: usize,
    ty: i32,
    rows: usize,
    cell_bytes: usize,
    cells: usize,
) -> Result<Block, Malformed> {
    let header = reader.bytes[start..reader.at].to_vec();
    if rows == 0 || cell_bytes == 0 {
        return Err(Malformed::Shape);
    }
    let size = rows
        .checked_mul(cells)
        .and_then(|elements| elements.checked_mul(cell_bytes))
        .ok_or(Malformed::Size)?;
    let offset = reader.at;
    reader.take(size)?;
    Ok(Block {
        header,
        ty,
        rows,
        cell_bytes,
        offset,
    })
}

/// Sum of squared differences and sum of squares of `a`, element by element for float types;
/// for other types 0 or infinity as the bytes are equal or not. `None` when a value is not finite.
fn compare_elements(ty: i32, a: &[u8], b: &[u8]) -> Option<(f64, f64)> {
    let decode: fn(&[u8]) -> f32 = match ty {
        GGML_TYPE_F32 => |bytes| f32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        GGML_TYPE_F16 => |bytes| f16_to_f32(u16::from_ne_bytes([bytes[0], bytes[1]])),
        GGML_TYPE_BF16 => {
            |bytes| f32::from_bits(u32::from(u16::from_ne_bytes([bytes[0], bytes[1]])) << 16)
        }
        _ => {
            return if a == b {
                Some((0.0, 1.0))
            } else {
                Some((f64::INFINITY, 1.0))
            }
        }
    };
    let width = if ty == GGML_TYPE_F32 { 4 } else { 2 };
    let (mut difference, mut norm) = (0.0_f64, 0.0_f64);
    for (x, y) in a.chunks_exact(width).zip(b.chunks_exact(width)) {
        let (x, y) = (f64::from(decode(x)), f64::from(decode(y)));
        if !x.is_finite() || !y.is_finite() {
            return None;
        }
        difference += (x - y) * (x - y);
        norm += x * x;
    }
    Some((difference, norm))
}

/// IEEE half precision to single precision.
fn f16_to_f32(half: u16) -> f32 {
    let sign = u32::from(half >> 15) << 31;
    let exponent = u32::from((half >> 10) & 0x1f);
    let mantissa = u32::from(half & 0x3ff);
    let bits = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise the mantissa.
            let shift = mantissa.leading_zeros() - 21;
            let mantissa = (mantissa << shift) & 0x3ff;
            sign | ((113 - shift) << 23) | (mantissa << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000,
        _ => sign | ((exponent + 112) << 23) | (mantissa << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A section of `cells` cells with two K layers (f16, 4 bytes a row) and one transposed V
    /// layer (f16, 3 embedding rows); cell `c`'s values are `c + 1`.
    fn section(cells: usize, positions: &[i32]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(cells as u32).to_ne_bytes());
        for &position in positions {
            out.extend_from_slice(&position.to_ne_bytes());
            out.extend_from_slice(&1_u32.to_ne_bytes());
            out.extend_from_slice(&3_i32.to_ne_bytes());
        }
        for word in [1_u32, 2, 0, 0] {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        let value = |cell: usize| f32_to_f16_exact(cell as f32 + 1.0);
        for _ in 0..2 {
            out.extend_from_slice(&GGML_TYPE_F16.to_ne_bytes());
            out.extend_from_slice(&4_u64.to_ne_bytes());
            for cell in 0..cells {
                out.extend_from_slice(&value(cell).to_ne_bytes());
                out.extend_from_slice(&value(cell).to_ne_bytes());
            }
        }
        out.extend_from_slice(&GGML_TYPE_F16.to_ne_bytes());
        out.extend_from_slice(&2_u32.to_ne_bytes());
        out.extend_from_slice(&3_u32.to_ne_bytes());
        for _ in 0..3 {
            for cell in 0..cells {
                out.extend_from_slice(&value(cell).to_ne_bytes());
            }
        }
        out
    }

    /// Small integers only.
    fn f32_to_f16_exact(value: f32) -> u16 {
        let bits = value.to_bits();
        let exponent = ((bits >> 23) & 0xff) as u16 - 112;
        (exponent << 10) | ((bits >> 13) & 0x3ff) as u16
    }

    #[test]
    fn half_floats_decode() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2.0_f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(f32_to_f16_exact(5.0)), 5.0);
    }

    #[test]
    fn a_well_formed_section_parses_and_its_head_is_a_section_of_its_first_cells() {
        let bytes = section(4, &[0, 1, 2, 3]);
        let parsed = Section::parse(&bytes, 4, None).unwrap();
        let shape = parsed.shape();
        let head = parsed.head(2);
        assert_eq!(head, {
            let mut expected = section(2, &[0, 1]);
            // The head's metadata names sequence 0.
            for cell in 0..2 {
                let at = 4 + cell * CELL_META_BYTES + 8;
                expected[at..at + 4].copy_from_slice(&0_i32.to_ne_bytes());
            }
            expected
        });
        assert!(Section::parse(&head, 2, Some(&shape)).is_ok());
    }

    #[test]
    fn hostile_metadata_is_refused() {
        let parse = |bytes: &[u8], tokens| Section::parse(bytes, tokens, None).map(|_| ());
        assert_eq!(
            parse(&section(3, &[0, 1, i32::MAX]), 3),
            Err(Malformed::Position)
        );
        assert_eq!(parse(&section(3, &[-1, 0, 1]), 3), Err(Malformed::Position));
        assert_eq!(parse(&section(3, &[0, 2, 1]), 3), Err(Malformed::Position));
        assert_eq!(parse(&section(3, &[0, 1, 2]), 4), Err(Malformed::CellCount));
        let mut two_sequences = section(3, &[0, 1, 2]);
        two_sequences[4 + 4..4 + 8].copy_from_slice(&2_u32.to_ne_bytes());
        assert_eq!(parse(&two_sequences, 3), Err(Malformed::Sequences));
        let full = section(3, &[0, 1, 2]);
        assert_eq!(parse(&full[..full.len() - 1], 3), Err(Malformed::Size));
        let mut longer = full.clone();
        longer.push(0);
        assert!(parse(&longer, 3).is_err());
        // A huge cell count fails on size before anything is read.
        let mut huge = full.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse(&huge, u32::MAX as usize).is_err());
        // Another model's shape.
        let shape = Section::parse(&section(2, &[0, 1]), 2, None)
            .unwrap()
            .shape();
        let mut other = full.clone();
        let layers_at = 4 + 3 * CELL_META_BYTES + 4;
        other[layers_at..layers_at + 4].copy_from_slice(&1_u32.to_ne_bytes());
        assert!(Section::parse(&other, 3, Some(&shape)).is_err());
    }

    #[test]
    fn tails_compare_within_rounding_and_differ_across_contexts() {
        let ours = section(4, &[0, 1, 2, 3]);
        let parsed = Section::parse(&ours, 4, None).unwrap();
        assert_eq!(parsed.tail_distance(&parsed, 2), 0.0);
        // Another context's last cell.
        let mut theirs = ours.clone();
        let last_k = 4 + 4 * CELL_META_BYTES + 16 + 12 + 3 * 4;
        theirs[last_k..last_k + 2].copy_from_slice(&f32_to_f16_exact(9.0).to_ne_bytes());
        let other = Section::parse(&theirs, 4, None).unwrap();
        assert!(parsed.tail_distance(&other, 2) > TAIL_DISTANCE_MAX);
        // The same cell before the checked tail is not compared.
        assert!(parsed.tail_distance(&other, 4) == 0.0);
        // Not a number never passes.
        theirs[last_k..last_k + 2].copy_from_slice(&0x7e00_u16.to_ne_bytes());
        let nan = Section::parse(&theirs, 4, None).unwrap();
        assert!(parsed.tail_distance(&nan, 2).is_infinite());
    }

    /// The committed corpus of checkpoint sections the fuzzer starts from
    /// (`tests/corpus/kv_checkpoint`; `FLEETGRID_WRITE_CORPUS=1` rewrites the
    /// seeds below).
    fn corpus() -> Vec<(String, Vec<u8>)> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/kv_checkpoint");
        if std::env::var_os("FLEETGRID_WRITE_CORPUS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            let mut seeds = vec![
                ("valid-1", section(1, &[0])),
                ("valid-4", section(4, &[0, 1, 2, 3])),
                ("positions-out-of-order", section(3, &[0, 2, 1])),
                ("position-max", section(2, &[0, i32::MAX])),
                ("position-negative", section(2, &[0, -1])),
            ];
            let mut huge = section(2, &[0, 1]);
            huge[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
            seeds.push(("cell-count-huge", huge));
            let valid = section(4, &[0, 1, 2, 3]);
            seeds.push(("truncated", valid[..valid.len() - 3].to_vec()));
            let mut layers = valid.clone();
            let at = 4 + 4 * CELL_META_BYTES + 4;
            layers[at..at + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
            seeds.push(("layers-huge", layers));
            for (name, bytes) in seeds {
                std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
            }
        }
        let mut corpus: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .expect("the committed corpus")
            .map(|entry| {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&path).unwrap())
            })
            .collect();
        corpus.sort();
        assert!(
            corpus.len() >= 8,
            "the corpus is missing: {}",
            dir.display()
        );
        corpus
    }

    /// Whatever a node sends as a checkpoint, parsing never panics, and what
    /// it accepts is a section of exactly the tokens asked, of this engine's
    /// shape, whose head re-parses.
    fn parse_is_total(bytes: &[u8], tokens: usize, shape: &Shape) {
        let Ok(parsed) = Section::parse(bytes, tokens, Some(shape)) else {
            return;
        };
        assert_eq!(parsed.cells, tokens);
        assert_eq!(&parsed.shape(), shape);
        for head in [1, tokens] {
            let cut = parsed.head(head);
            let again = Section::parse(&cut, head, Some(shape)).expect("a head parses");
            assert_eq!(again.cells, head);
        }
    }

    #[test]
    fn the_corpus_parses_as_it_should() {
        let shape = Section::parse(&section(4, &[0, 1, 2, 3]), 4, None)
            .unwrap()
            .shape();
        for (name, bytes) in corpus() {
            let accepted =
                (1..=4).any(|tokens| Section::parse(&bytes, tokens, Some(&shape)).is_ok());
            assert_eq!(accepted, name.starts_with("valid"), "{name}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 20_000,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Mutations of the corpus: bytes overwritten, words overwritten with
        /// extreme values, cuts and repeats.
        #[test]
        fn a_mutated_checkpoint_never_panics_the_parser(
            seed in 0_usize..64,
            writes in proptest::collection::vec((0_usize..4096, proptest::prelude::any::<u8>()), 0..8),
            words in proptest::collection::vec((0_usize..1024, proptest::sample::select(vec![0_u32, 1, 2, u32::MAX, i32::MAX as u32, 0x8000_0000])), 0..4),
            cut in proptest::option::of(0_usize..4096),
            repeat in proptest::option::of((0_usize..256, 0_usize..256)),
            tokens in 1_usize..6,
        ) {
            static CORPUS: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
            let corpus = CORPUS.get_or_init(corpus);
            let shape = Section::parse(&section(4, &[0, 1, 2, 3]), 4, None).unwrap().shape();
            let mut bytes = corpus[seed % corpus.len()].1.clone();
            for (at, byte) in writes {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] = byte;
                }
            }
            for (word, value) in words {
                let at = word * 4;
                if at + 4 <= bytes.len() {
                    bytes[at..at + 4].copy_from_slice(&value.to_ne_bytes());
                }
            }
            if let Some((from, length)) = repeat {
                if from + length <= bytes.len() {
                    let piece = bytes[from..from + length].to_vec();
                    bytes.splice(from..from, piece);
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            parse_is_total(&bytes, tokens, &shape);
        }
    }
}
