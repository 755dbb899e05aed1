package extauthz

import (
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/envoy/contract"
)

// Pre-encoded dynamic metadata. Marshalling the metadata Struct, a map of ten Values, was
// the largest cost of an allowed Check on mcpgate's side (protobuf-go walks maps by
// reflection: ~7 µs and 19 allocations for a 500-byte response). Its entries are the same
// for every request of one route and one token except the decision ID, so each cached
// routeValues and principalValues also keeps its entries in wire form, and a response
// carries the metadata as the encoded dynamic_metadata field, set as the message's
// unknown fields: protobuf-go writes them verbatim after the known fields, and the
// receiver (Envoy) parses them as the dynamic_metadata field, since it is one. A reader
// in this process must marshal and unmarshal the response to see its metadata (wire.go's
// tests show the result equals the Struct the reflective path would send).

// dynamicMetadataField is CheckResponse.dynamic_metadata's field number.
var dynamicMetadataField = (&authv3.CheckResponse{}).ProtoReflect().Descriptor().Fields().ByName("dynamic_metadata").Number()

// Field numbers of google.protobuf.Struct (fields = 1, a map: entries with key = 1 and
// value = 2) and google.protobuf.Value (string_value = 3).
const (
	structFields     protowire.Number = 1
	mapEntryKey      protowire.Number = 1
	mapEntryValue    protowire.Number = 2
	valueStringValue protowire.Number = 3
)

// structEntries encodes map entries of a Struct's fields, in the order given. It returns
// nil if a value cannot be encoded (a string that is not valid UTF-8): the caller then
// sends the Struct itself, which fails the same way it always did.
func structEntries(kv ...any) []byte {
	var out []byte
	for i := 0; i+1 < len(kv); i += 2 {
		key, _ := kv[i].(string)
		v, _ := kv[i+1].(*structpb.Value)
		if v == nil {
			continue
		}
		val, err := proto.MarshalOptions{Deterministic: true}.Marshal(v)
		if err != nil {
			return nil
		}
		out = appendEntry(out, key, val)
	}
	if out == nil {
		out = []byte{}
	}
	return out
}

// appendEntry appends one Struct.fields entry: key → the encoded Value val.
func appendEntry(b []byte, key string, val []byte) []byte {
	n := protowire.SizeTag(mapEntryKey) + protowire.SizeBytes(len(key)) + protowire.SizeTag(mapEntryValue) + protowire.SizeBytes(len(val))
	b = protowire.AppendTag(b, structFields, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(n))
	b = protowire.AppendTag(b, mapEntryKey, protowire.BytesType)
	b = protowire.AppendString(b, key)
	b = protowire.AppendTag(b, mapEntryValue, protowire.BytesType)
	return protowire.AppendBytes(b, val)
}

// stringValueSize is the encoded size of a Value holding s.
func stringValueSize(s string) int {
	return protowire.SizeTag(valueStringValue) + protowire.SizeBytes(len(s))
}

// setWireMetadata sets resp's dynamic_metadata, encoded: the decision ID's entry followed
// by the pre-encoded entries of parts. The decision ID is hex, so always valid UTF-8.
func setWireMetadata(resp *authv3.CheckResponse, decisionID string, parts ...[]byte) {
	idVal := stringValueSize(decisionID)
	idEntry := protowire.SizeTag(mapEntryKey) + protowire.SizeBytes(len(contract.MetaDecisionID)) + protowire.SizeTag(mapEntryValue) + protowire.SizeBytes(idVal)
	size := protowire.SizeTag(structFields) + protowire.SizeBytes(idEntry)
	for _, p := range parts {
		size += len(p)
	}
	b := make([]byte, 0, protowire.SizeTag(dynamicMetadataField)+protowire.SizeBytes(size))
	b = protowire.AppendTag(b, dynamicMetadataField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(size))
	b = protowire.AppendTag(b, structFields, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(idEntry))
	b = protowire.AppendTag(b, mapEntryKey, protowire.BytesType)
	b = protowire.AppendString(b, contract.MetaDecisionID)
	b = protowire.AppendTag(b, mapEntryValue, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(idVal))
	b = protowire.AppendTag(b, valueStringValue, protowire.BytesType)
	b = protowire.AppendString(b, decisionID)
	for _, p := range parts {
		b = append(b, p...)
	}
	resp.ProtoReflect().SetUnknown(protoreflect.RawFields(b))
}
