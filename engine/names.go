package engine

import (
	"fmt"
	"strings"
)

// maxLabelLength is the longest DNS-1123 label.
const maxLabelLength = 63

// maxVolumeIDLength bounds volume IDs (CSI volume IDs are PV names).
const maxVolumeIDLength = 128

// Key names a cache: caches are namespaced, and the same name in two
// namespaces is two caches that never share bytes.
type Key struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
}

// String returns "namespace/name".
func (k Key) String() string { return k.Namespace + "/" + k.Name }

// Validate checks both parts of the key. It is called again wherever a key
// turns into a path, whatever the caller validated before.
func (k Key) Validate() error {
	if err := ValidateName(k.Namespace); err != nil {
		return fmt.Errorf("invalid namespace %q: %w", k.Namespace, err)
	}
	if err := ValidateName(k.Name); err != nil {
		return fmt.Errorf("invalid cache name %q: %w", k.Name, err)
	}
	return nil
}

// ParseKey parses "namespace/name".
func ParseKey(s string) (Key, error) {
	ns, name, ok := strings.Cut(s, "/")
	if !ok {
		return Key{}, fmt.Errorf("invalid cache %q: want NAMESPACE/NAME", s)
	}
	k := Key{Namespace: ns, Name: name}
	if err := k.Validate(); err != nil {
		return Key{}, err
	}
	return k, nil
}

// ValidateName reports whether s is a DNS-1123 label: 1 to 63 characters,
// lower-case letters, digits and '-', starting and ending with a letter or
// digit. Such a name is always one safe path component.
func ValidateName(s string) error {
	if s == "" {
		return fmt.Errorf("must not be empty")
	}
	if len(s) > maxLabelLength {
		return fmt.Errorf("must be at most %d characters", maxLabelLength)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case isLowerAlnum(c):
		case c == '-' && i != 0 && i != len(s)-1:
		default:
			return fmt.Errorf("must consist of lower case letters, digits and '-', and start and end with a letter or digit (a DNS-1123 label)")
		}
	}
	return nil
}

// ValidateVolumeID reports whether id can name a volume: 1 to 128
// characters of lower-case letters, digits, '-' and '.', starting and ending
// with a letter or digit, with no "..". PV names satisfy it.
func ValidateVolumeID(id string) error {
	if id == "" {
		return fmt.Errorf("invalid volume ID: must not be empty")
	}
	if len(id) > maxVolumeIDLength {
		return fmt.Errorf("invalid volume ID %q: must be at most %d characters", id, maxVolumeIDLength)
	}
	if strings.Contains(id, "..") {
		return fmt.Errorf("invalid volume ID %q: must not contain \"..\"", id)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case isLowerAlnum(c):
		case (c == '-' || c == '.') && i != 0 && i != len(id)-1:
		default:
			return fmt.Errorf("invalid volume ID %q: must consist of lower case letters, digits, '-' and '.', and start and end with a letter or digit", id)
		}
	}
	return nil
}

func isLowerAlnum(c byte) bool {
	return ('a' <= c && c <= 'z') || ('0' <= c && c <= '9')
}
