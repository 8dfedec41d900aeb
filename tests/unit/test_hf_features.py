"""The `datasets` features metadata of our Parquet shards, built without importing `datasets`, must be the
very bytes `datasets` itself gives: that is what makes `load_dataset("parquet", ...)` return PIL images."""

import pyarrow as pa

from synthalign_ray.stages.responses import RESPONSES_TYPE
from synthalign_ray.store import IMAGE_TYPE, hf_features_metadata, hf_features_metadata_by_datasets, with_hf_features

EVERY_MAPPED_TYPE = pa.schema(
    [
        ("id", pa.string()),
        ("seed", pa.int64()),
        ("image_index", pa.int32()),
        ("margin", pa.float32()),
        ("score", pa.float64()),
        ("half", pa.float16()),
        ("flag", pa.bool_()),
        ("nothing", pa.null()),
        ("small", pa.int8()),
        ("u", pa.uint64()),
        ("u8", pa.uint8()),
        ("big_text", pa.large_string()),
        ("blob", pa.binary()),
        ("big_blob", pa.large_binary()),
        ("image", IMAGE_TYPE),
        ("candidate_images", pa.list_(IMAGE_TYPE)),
        ("image_scores", pa.list_(pa.float32())),
        ("responses", RESPONSES_TYPE),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())])))]))),
        ("objectives", pa.list_(pa.struct([("helpfulness", pa.float32()), ("nested_image", IMAGE_TYPE)]))),
        ("triple", pa.list_(pa.int16(), 3)),
        ("many", pa.large_list(pa.uint32())),
        ("image_pair", pa.large_list(IMAGE_TYPE)),  # only list<image> is an image list, as before
    ]
)


def test_mapped_types_give_the_bytes_datasets_gives():
    assert hf_features_metadata(EVERY_MAPPED_TYPE) == hf_features_metadata_by_datasets(EVERY_MAPPED_TYPE)


def test_image_columns_are_image_features():
    features = hf_features_metadata(EVERY_MAPPED_TYPE).decode()
    assert '"image": {"_type": "Image"}' in features
    assert '"candidate_images": {"feature": {"_type": "Image"}, "_type": "List"}' in features


def test_types_not_mapped_here_go_to_datasets():
    schema = pa.schema([("id", pa.string()), ("when", pa.timestamp("us", tz="UTC")), ("tag", pa.dictionary(pa.int32(), pa.string()))])
    assert hf_features_metadata(schema) == hf_features_metadata_by_datasets(schema)
    assert b'"timestamp[us, tz=UTC]"' in hf_features_metadata(schema)


def test_features_already_recorded_in_the_schema_are_what_datasets_starts_from():
    recorded = pa.schema([("image", IMAGE_TYPE)], metadata={b"huggingface": hf_features_metadata(pa.schema([("image", pa.struct([("bytes", pa.binary())]))]))})
    assert hf_features_metadata(recorded) == hf_features_metadata_by_datasets(recorded)


def test_with_hf_features_keeps_other_metadata():
    table = pa.table({"id": ["a"]}).replace_schema_metadata({b"pandas": b"{}"})
    metadata = with_hf_features(table).schema.metadata
    assert metadata[b"pandas"] == b"{}" and metadata[b"huggingface"] == hf_features_metadata(table.schema)
