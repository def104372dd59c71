"""Fixtures shared by the test modules."""

import re
import struct
import zipfile

import pytest

# A zip local file header is 30 bytes, then the file name and the extra field.
LOCAL_HEADER_SIZE = 30


@pytest.fixture
def corrupt_tensor_data():
    """Return a function that inverts `count` bytes inside a torch zip file's largest tensor.

    The tensor data records are the `<archive>/data/<N>` entries, stored uncompressed, so the
    inverted bytes change a tensor's values and leave the pickled structure intact.
    """

    def corrupt(path, count=100):
        with zipfile.ZipFile(path) as archive:
            records = [
                info for info in archive.infolist() if re.search(r"/data/\d+$", info.filename)
            ]
        record = max(records, key=lambda info: info.file_size)
        assert record.compress_type == zipfile.ZIP_STORED
        assert record.file_size > count
        raw = bytearray(path.read_bytes())
        header = record.header_offset
        name_length, extra_length = struct.unpack("<HH", raw[header + 26 : header + 30])
        start = header + LOCAL_HEADER_SIZE + name_length + extra_length
        start += (record.file_size - count) // 2
        for offset in range(start, start + count):
            raw[offset] ^= 0xFF
        path.write_bytes(bytes(raw))
        return record.filename

    return corrupt
