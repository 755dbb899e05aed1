package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReadSessionKey(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hex := strings.Repeat("ab", 32)
	if k, err := readSessionKey(write("ok", hex+"\n")); err != nil || string(k) != hex {
		t.Fatalf("key %q, err %v", k, err)
	}
	if k, err := readSessionKey(""); err != nil || k != nil {
		t.Fatalf("no file: key %q, err %v", k, err)
	}
	for name, content := range map[string]string{"short": "0123456789\n", "empty": "", "newlines only": "\n\n"} {
		if _, err := readSessionKey(write(name, content)); err == nil || !strings.Contains(err.Error(), "at least 32") {
			t.Errorf("%s: err %v, want the size named", name, err)
		}
	}
	if _, err := readSessionKey(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "--session-key-file") {
		t.Errorf("missing file: err %v", err)
	}
}
