package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// runBuildImage runs deploy/build-image.sh with the given VERSION, as a
// release would, printing the docker commands instead of running them.
func runBuildImage(t *testing.T, version string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := exec.Command("bash", append([]string{"build-image.sh", "--dry-run"}, args...)...)
	cmd.Env = append(os.Environ(), "VERSION="+version)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

func goModVersion(t *testing.T) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(readFile(t, "../go.mod"))
	if m == nil {
		t.Fatal("go.mod has no go line")
	}
	return string(m[1])
}

// TestBuildImageScriptProducesThePinnedImage: on the release tag of the
// chart's appVersion the script builds (and with --push pushes) exactly
// the image deploy/kubernetes and the chart run.
func TestBuildImageScriptProducesThePinnedImage(t *testing.T) {
	app := chartAppVersion(t)
	out, errOut, err := runBuildImage(t, "v"+app, "--push")
	if err != nil {
		t.Fatalf("build-image.sh on release tag v%s: %v\n%s", app, err, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("want a build and a push, got:\n%s", out)
	}
	build, push := lines[0], lines[1]
	for _, want := range []string{
		"docker build -f deploy/Dockerfile --target cortex-extproc",
		"-t " + releaseImage(t) + " .",
		"--build-arg GO_VERSION=" + goModVersion(t) + " ",
		"--build-arg VERSION=v" + app + " ",
		"DOCKER_BUILDKIT=1",
	} {
		if !strings.Contains(build, want) {
			t.Errorf("build command %q lacks %q", build, want)
		}
	}
	if push != "docker push "+releaseImage(t) {
		t.Errorf("push command %q, want docker push %s", push, releaseImage(t))
	}
}

func TestBuildImageScriptRefusesAReleaseTheManifestsDoNotPin(t *testing.T) {
	_, errOut, err := runBuildImage(t, "v9.9.9")
	if err == nil {
		t.Fatal("build-image.sh built release v9.9.9, which the chart's appVersion does not name")
	}
	if !strings.Contains(errOut, "appVersion \""+chartAppVersion(t)+"\"") || !strings.Contains(errOut, "set appVersion") {
		t.Errorf("error %q does not say which appVersion to change", errOut)
	}
}

// Between releases the image is tagged with git describe's distance from
// the last one, and said to be for testing.
func TestBuildImageScriptTagsBetweenReleases(t *testing.T) {
	out, errOut, err := runBuildImage(t, "v0.1.0-3-gabc1234-dirty")
	if err != nil {
		t.Fatalf("%v: %s", err, errOut)
	}
	if !strings.Contains(out, "-t ghcr.io/helexa/cortex-extproc:0.1.0-3-gabc1234-dirty .") || strings.Contains(out, "docker push") {
		t.Errorf("between releases: %s", out)
	}
	if !strings.Contains(errOut, "not a release tag") {
		t.Errorf("no warning that the image is not a release: %q", errOut)
	}
	if _, errOut, err := runBuildImage(t, "v0.1.0", "--bogus"); err == nil || !strings.Contains(errOut, "unknown argument \"--bogus\"") {
		t.Errorf("unknown flag accepted (%v): %s", err, errOut)
	}
}

// The official golang images set GOTOOLCHAIN=local: their Go must be the
// one go.mod asks for, or the build stops at "go.mod requires go >= …".
func TestDockerfileGoMatchesGoMod(t *testing.T) {
	m := regexp.MustCompile(`(?m)^ARG GO_VERSION=(\S+)$`).FindSubmatch(readFile(t, "Dockerfile"))
	if m == nil {
		t.Fatal("deploy/Dockerfile has no ARG GO_VERSION default")
	}
	if got, want := string(m[1]), goModVersion(t); got != want {
		t.Errorf("Dockerfile GO_VERSION %s, go.mod asks for go %s", got, want)
	}
	if !regexp.MustCompile(`(?m)^FROM golang:\$\{GO_VERSION\} AS build$`).Match(readFile(t, "Dockerfile")) {
		t.Error("the build stage does not use golang:${GO_VERSION}")
	}
}
