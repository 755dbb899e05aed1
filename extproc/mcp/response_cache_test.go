package mcp

import "testing"

func TestSetResultString(t *testing.T) {
	for in, want := range map[string]string{
		`{"jsonrpc":"2.0","id":1,"result":{"tools":[],"cacheScope":"public","ttlMs":60000}}`: `{"jsonrpc":"2.0","id":1,"result":{"tools":[],"cacheScope":"private","ttlMs":60000}}`,
		`{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}`:                                     `{"jsonrpc":"2.0","id":1,"result":{"cacheScope":"private","tools":[]}}`,
		`{"jsonrpc":"2.0","id":1,"result":{ }}`:                                              `{"jsonrpc":"2.0","id":1,"result":{"cacheScope":"private" }}`,
		`{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"x"}}`:                         `{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"x"}}`,
		`{"jsonrpc":"2.0","id":1,"result":{"tools":[{"cacheScope":"public"}]}}`:              `{"jsonrpc":"2.0","id":1,"result":{"cacheScope":"private","tools":[{"cacheScope":"public"}]}}`,
	} {
		got, err := SetResultString([]byte(in), "cacheScope", "private")
		if err != nil || string(got) != want {
			t.Errorf("SetResultString(%s) = %s, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{`{"result":{"cacheScope":"a","cacheScope":"b"}}`, `{"result":[]}`, `[]`, `{"result":{`} {
		if got, err := SetResultString([]byte(bad), "cacheScope", "private"); err == nil {
			t.Errorf("SetResultString(%s) = %s, want an error", bad, got)
		}
	}
}
