//! Reading one flat string column of a parquet file of which only some byte ranges are at hand
//! (the footer and that column's chunks), so that a remote file's other columns (images) are never
//! downloaded.

use std::sync::Arc;

use bytes::{Buf, Bytes};
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReaderImpl;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::errors::ParquetError;
use parquet::file::metadata::{FooterTail, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::serialized_reader::SerializedPageReader;

/// Size of a parquet file's fixed tail: metadata length (u32 LE) + magic `PAR1`.
pub(crate) const FOOTER_TAIL_LEN: u64 = 8;

/// How many bytes to ask for at the end of a file: usually holds the whole footer metadata.
pub(crate) const FOOTER_PREFETCH: u64 = 64 * 1024;

/// Ranges of a column closer than this many bytes are fetched as one request.
pub(crate) const COALESCE_GAP: u64 = 4 * 1024;

/// The fetched byte ranges of a file of known length, addressed by file offset.
#[derive(Debug, Default)]
pub(crate) struct SparseFile {
    len: u64,
    /// Non-overlapping pieces sorted by start offset.
    pieces: Vec<(u64, Bytes)>,
}

impl SparseFile {
    /// An empty view of a file of `len` bytes.
    pub(crate) fn new(len: u64) -> Self {
        Self {
            len,
            pieces: Vec::new(),
        }
    }

    /// Records the bytes starting at file offset `start`. Pieces must not overlap.
    pub(crate) fn insert(&mut self, start: u64, bytes: Bytes) {
        let at = self.pieces.partition_point(|(s, _)| *s < start);
        self.pieces.insert(at, (start, bytes));
    }

    /// The piece holding offset `start`, as (piece start, piece bytes).
    fn piece_at(&self, start: u64) -> Option<&(u64, Bytes)> {
        let after = self.pieces.partition_point(|(s, _)| *s <= start);
        let piece = self.pieces.get(after.checked_sub(1)?)?;
        (start < piece.0 + piece.1.len() as u64).then_some(piece)
    }

    /// Whether `start..end` lies inside one fetched piece.
    pub(crate) fn covers(&self, start: u64, end: u64) -> bool {
        self.piece_at(start)
            .is_some_and(|(s, b)| end <= s + b.len() as u64)
    }

    /// The bytes from `start` to the end of the piece holding `start`.
    fn bytes_from(&self, start: u64) -> parquet::errors::Result<Bytes> {
        let (piece_start, bytes) = self.piece_at(start).ok_or_else(|| {
            ParquetError::General(format!("byte {start} of the file was not fetched"))
        })?;
        Ok(bytes.slice((start - piece_start) as usize..))
    }
}

impl Length for SparseFile {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for SparseFile {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(self.bytes_from(start)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let bytes = self.bytes_from(start)?;
        if bytes.len() < length {
            return Err(ParquetError::General(format!(
                "bytes {start}..{} of the file were not fetched",
                start + length as u64
            )));
        }
        Ok(bytes.slice(..length))
    }
}

/// What the bytes at the end of a file tell about its footer metadata.
pub(crate) enum Footer {
    /// The metadata, decoded.
    Decoded(Box<ParquetMetaData>),
    /// The metadata starts earlier: fetch from this file offset up to the fetched tail.
    StartsAt(u64),
}

/// Decodes the footer of a file of `file_len` bytes from its last `tail.len()` bytes.
pub(crate) fn parse_footer(file_len: u64, tail: &[u8]) -> Result<Footer, String> {
    let tail_len = tail.len() as u64;
    if tail_len < FOOTER_TAIL_LEN || file_len < FOOTER_TAIL_LEN + 4 {
        return Err(format!(
            "file of {file_len} bytes is too short to be parquet"
        ));
    }
    let last8 = &tail[tail.len() - FOOTER_TAIL_LEN as usize..];
    let footer = FooterTail::try_from(last8).map_err(|e| e.to_string())?;
    if footer.is_encrypted_footer() {
        return Err("encrypted parquet files are not supported".to_string());
    }
    let meta_len = footer.metadata_length() as u64;
    if meta_len + FOOTER_TAIL_LEN > file_len {
        return Err(format!(
            "footer metadata length {meta_len} exceeds the file size {file_len}"
        ));
    }
    if meta_len + FOOTER_TAIL_LEN > tail_len {
        return Ok(Footer::StartsAt(file_len - FOOTER_TAIL_LEN - meta_len));
    }
    let end = tail.len() - FOOTER_TAIL_LEN as usize;
    let meta = ParquetMetaDataReader::decode_metadata(&tail[end - meta_len as usize..end])
        .map_err(|e| e.to_string())?;
    Ok(Footer::Decoded(Box::new(meta)))
}

/// Why a column cannot be read as prompts.
pub(crate) enum ColumnLookupError {
    /// No top-level leaf column of that name; lists the top-level fields.
    Missing(Vec<String>),
    /// The column exists but is not a flat byte-array column.
    NotString(String),
}

/// Index (among leaf columns) of the flat top-level string column `name`.
pub(crate) fn find_string_column(
    meta: &ParquetMetaData,
    name: &str,
) -> Result<usize, ColumnLookupError> {
    let schema = meta.file_metadata().schema_descr();
    let Some(index) = schema
        .columns()
        .iter()
        .position(|c| c.path().parts() == [name])
    else {
        let available = schema
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        return Err(ColumnLookupError::Missing(available));
    };
    let column = schema.column(index);
    if column.physical_type() != PhysicalType::BYTE_ARRAY || column.max_rep_level() > 0 {
        return Err(ColumnLookupError::NotString(format!(
            "physical type {}, {} repetition level(s)",
            column.physical_type(),
            column.max_rep_level()
        )));
    }
    Ok(index)
}

/// The byte range `start..end` of the column's chunk in each row group, in row-group order.
pub(crate) fn chunk_ranges(meta: &ParquetMetaData, column: usize) -> Vec<(u64, u64)> {
    meta.row_groups()
        .iter()
        .map(|rg| {
            let chunk = rg.column(column);
            let start = chunk
                .dictionary_page_offset()
                .filter(|&d| d > 0)
                .unwrap_or_else(|| chunk.data_page_offset())
                .max(0) as u64;
            let len = chunk.compressed_size().max(0) as u64;
            (start, start + len)
        })
        .collect()
}

/// Merges ranges (sorted or not) whose gap is at most `max_gap` bytes; the result is sorted.
pub(crate) fn coalesce(ranges: &[(u64, u64)], max_gap: u64) -> Vec<(u64, u64)> {
    let mut sorted: Vec<(u64, u64)> = ranges.iter().copied().filter(|(s, e)| e > s).collect();
    sorted.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (start, end) in sorted {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(max_gap) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Decodes every row of leaf column `column` (a flat byte-array column) from the fetched bytes,
/// in file order; `None` marks a null.
pub(crate) fn read_byte_array_column(
    file: &Arc<SparseFile>,
    meta: &ParquetMetaData,
    column: usize,
) -> parquet::errors::Result<Vec<Option<ByteArray>>> {
    let descr = meta.file_metadata().schema_descr().column(column);
    let nullable = descr.max_def_level() > 0;
    let mut rows = Vec::new();
    for rg in meta.row_groups() {
        let num_rows = usize::try_from(rg.num_rows()).unwrap_or(0);
        let pages = SerializedPageReader::new(Arc::clone(file), rg.column(column), num_rows, None)?;
        let mut reader = ColumnReaderImpl::<ByteArrayType>::new(descr.clone(), Box::new(pages));
        let mut read = 0;
        while read < num_rows {
            let mut defs = Vec::new();
            let mut values = Vec::new();
            let (records, _, _) =
                reader.read_records(num_rows - read, Some(&mut defs), None, &mut values)?;
            if records == 0 {
                return Err(ParquetError::General(format!(
                    "row group ends after {read} of its {num_rows} rows"
                )));
            }
            if nullable {
                let mut values = values.into_iter();
                for def in defs {
                    rows.push(if def == descr.max_def_level() {
                        values.next()
                    } else {
                        None
                    });
                }
            } else {
                rows.extend(values.into_iter().map(Some));
            }
            read += records;
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_close_ranges_and_keeps_far_ones_apart() {
        let merged = coalesce(&[(100, 200), (0, 50), (52, 60), (10_000, 10_010)], 4);
        assert_eq!(merged, vec![(0, 60), (100, 200), (10_000, 10_010)]);
    }

    #[test]
    fn sparse_file_serves_only_fetched_bytes() {
        let mut file = SparseFile::new(1000);
        file.insert(100, Bytes::from_static(b"abcdef"));
        assert_eq!(file.get_bytes(102, 3).unwrap(), Bytes::from_static(b"cde"));
        assert!(file.covers(100, 106));
        assert!(!file.covers(100, 107));
        assert!(file.get_bytes(104, 5).is_err());
        assert!(file.get_bytes(99, 1).is_err());
    }
}
